from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_store.errors import Code, StoreError
from clip_store.location import StorageSettings, store_uri
from clip_store.shards import ingest_shards, read_shard, s3_still_current
from clip_store.store import Ingested, VectorStore
from tests.store.appender import append_one_shard
from tests.store.support import put_shard, shard, stored, table_of, tombstone_count, trusting, unit_vectors, urls
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET

APPENDERS = 8
OWN_ROWS = 40
#: Objects every appender's shard holds too: the same image embedded by several jobs at once.
SHARED = [f"shared/{i:03d}.jpg" for i in range(15)]


def test_eight_concurrent_appenders_on_s3_leave_every_image_exactly_once(s3_endpoint: str) -> None:
    uri = store_uri(OUTPUT_BUCKET, "out", "test-tiny-clip__random")
    shared_vectors = unit_vectors(len(SHARED), 16, seed=99)
    shard_urls = []
    for child in range(APPENDERS):
        names = [f"child{child}/{i:03d}.jpg" for i in range(OWN_ROWS)] + SHARED
        vectors = np.vstack([unit_vectors(OWN_ROWS, 16, seed=child), shared_vectors])
        shard_urls.append(put_shard(shard(names, vectors), f"out/parquet/m/job/shard-{child:05d}.parquet"))

    # Processes, not threads: each appender has its own LanceDB runtime and S3 connections, as
    # Batch children do, and all start on a store that does not exist yet.
    with ProcessPoolExecutor(APPENDERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(append_one_shard, [uri] * APPENDERS, shard_urls))

    store = VectorStore(uri)
    stored = table_of(store).to_arrow().column("url").to_pylist()
    assert len(stored) == len(set(stored)) == APPENDERS * OWN_ROWS + len(SHARED)
    assert set(stored) == {
        url for shard_url in shard_urls for url in read_shard(boto3.client("s3"), shard_url).rows.column("url").to_pylist()
    }
    assert sum(result.inserted for result in results) == len(stored)
    assert sum(result.unchanged for result in results) == (APPENDERS - 1) * len(SHARED)
    assert store.count() == len(stored)


def test_ingesting_the_same_shard_again_adds_and_rewrites_nothing(local_uri: str) -> None:
    store = VectorStore(local_uri)
    rows = shard([f"{i}.jpg" for i in range(30)], unit_vectors(30, 8, seed=1))
    assert store.ingest(rows, shard="s3://out/shard-0.parquet", still_current=trusting) == Ingested(30, 0, 0, 0)
    version = table_of(store).version

    assert store.ingest(rows, shard="s3://out/shard-0.parquet", still_current=trusting) == Ingested(0, 0, 30, 0)
    assert store.count() == 30
    assert table_of(store).to_arrow().num_rows == 30
    stored = table_of(store).search().where(f"url = '{urls(['0.jpg'])[0]}'").to_arrow()
    assert stored.column("shard").to_pylist() == ["s3://out/shard-0.parquet"]
    assert table_of(store).version <= version + 1


def test_a_changed_object_replaces_its_vector_and_a_batch_keeps_each_urls_last_row(local_uri: str) -> None:
    store = VectorStore(local_uri)
    old, new, newest = unit_vectors(3, 8, seed=2)
    store.ingest(shard(["cat.jpg"], old[None]), shard="a", still_current=trusting)

    result = store.ingest(
        shard(["cat.jpg", "cat.jpg"], np.vstack([new, newest]), etags=["etag-2", "etag-3"]), shard="b", still_current=trusting
    )

    assert result == Ingested(0, 1, 0, 0)
    assert store.count() == 1
    np.testing.assert_allclose(stored(store, urls(["cat.jpg"])[0]), newest)


def test_a_late_shard_of_an_older_upload_never_replaces_the_newer_vector(local_uri: str) -> None:
    store = VectorStore(local_uri)
    first, second, third = (datetime(2026, 11, 30, 12, 0, second, tzinfo=UTC) for second in (0, 1, 2))
    old, new, newest = unit_vectors(3, 8, seed=12)
    cat = urls(["cat.jpg"])[0]
    store.ingest(shard(["cat.jpg"], new[None], etags="etag-2", modified=[second]), shard="b", still_current=trusting)

    # The first upload's job was retried and finished after the second upload's.
    late = store.ingest(shard(["cat.jpg"], old[None], etags="etag-1", modified=[first]), shard="a", still_current=trusting)
    assert late == Ingested(0, 0, 1, 0)
    np.testing.assert_allclose(stored(store, cat), new)

    # Within one batch too, the newest version wins whatever the shards' order.
    together = shard(["cat.jpg", "cat.jpg"], np.vstack([newest, old]), etags=["etag-3", "etag-1"], modified=[third, first])
    assert store.ingest(together, shard="c", still_current=trusting) == Ingested(0, 1, 0, 0)
    np.testing.assert_allclose(stored(store, cat), newest)
    assert table_of(store).to_arrow().column("last_modified").to_pylist() == [third]


def test_a_deleted_object_leaves_search_and_comes_back_when_uploaded_again(s3_endpoint: str) -> None:
    s3 = boto3.client("s3")
    store = VectorStore(store_uri(OUTPUT_BUCKET, "", "m"))
    still_current = s3_still_current(s3)
    names = ["dog's dinner.jpg", "cat.jpg", "bird.jpg"]  # a quote in a key: filters are SQL
    for name in names:
        s3.put_object(Bucket=INPUT_BUCKET, Key=name, Body=b"first upload")
    etag = s3.head_object(Bucket=INPUT_BUCKET, Key=names[0])["ETag"].strip('"')
    vectors = unit_vectors(3, 8, seed=3)
    first = shard(names, vectors, etags=etag)
    store.ingest(first, shard="first", still_current=still_current)
    dog = urls(names)[0]

    s3.delete_object(Bucket=INPUT_BUCKET, Key=names[0])
    assert store.delete([dog]) == 1
    assert dog not in [match.url for match in store.nearest(vectors[0], 3)]
    assert store.vector_of(dog) is None and store.count() == 2
    # The same object's row arriving late (a second job had embedded it before the delete).
    assert store.ingest(first, shard="late", still_current=still_current) == Ingested(0, 0, 2, 1)
    assert store.vector_of(dog) is None

    s3.put_object(Bucket=INPUT_BUCKET, Key=names[0], Body=b"second upload")
    etag = s3.head_object(Bucket=INPUT_BUCKET, Key=names[0])["ETag"].strip('"')
    assert store.ingest(shard(names[:1], vectors[:1], etags=etag), shard="again", still_current=still_current) == Ingested(
        1, 0, 0, 0
    )
    assert store.nearest(vectors[0], 1)[0].url == dog
    # The tombstone stays: the removed version's shard, redelivered, is still refused.
    assert tombstone_count(store) == 1
    assert store.ingest(first.slice(0, 1), shard="redelivered", still_current=still_current) == Ingested(0, 0, 0, 1)
    assert store.nearest(vectors[0], 1)[0].url == dog
    assert store.delete([dog]) == 1 and store.delete([dog]) == 0


def test_a_deletion_before_anything_was_stored_still_keeps_the_object_out(local_uri: str) -> None:
    store = VectorStore(local_uri)
    assert store.delete(urls(["gone.jpg"])) == 0
    result = store.ingest(
        shard(["gone.jpg", "here.jpg"], unit_vectors(2, 8, seed=4)), shard="s", still_current=lambda url, etag: False
    )
    assert result == Ingested(1, 0, 0, 1)
    assert store.count() == 1


def test_a_shard_of_another_width_or_shape_is_refused_by_code(local_uri: str) -> None:
    store = VectorStore(local_uri)
    store.ingest(shard(["a.jpg"], unit_vectors(1, 8, seed=5)), shard="s", still_current=trusting)

    with pytest.raises(StoreError) as wider:
        store.ingest(shard(["b.jpg"], unit_vectors(1, 16, seed=5)), shard="s3://out/wide.parquet", still_current=trusting)
    with pytest.raises(StoreError) as query:
        store.nearest(np.ones(16, np.float32), 1)
    with pytest.raises(StoreError) as no_vectors:
        store.ingest(
            shard(["c.jpg"], unit_vectors(1, 8, seed=5)).drop_columns(["etag"]),
            shard="s3://out/odd.parquet",
            still_current=trusting,
        )

    assert wider.value.code == query.value.code == Code.DIMENSION_MISMATCH
    assert "s3://out/wide.parquet has 16-d vectors; this store holds 8-d" in wider.value.message
    assert no_vectors.value.code == Code.BAD_SHARD and "lacks etag" in no_vectors.value.message
    assert store.count() == 1


def test_an_unreadable_shard_is_a_bad_shard(s3_endpoint: str) -> None:
    boto3.client("s3").put_object(Bucket=OUTPUT_BUCKET, Key="junk.parquet", Body=b"not parquet")
    with pytest.raises(StoreError) as refused:
        read_shard(boto3.client("s3"), f"s3://{OUTPUT_BUCKET}/junk.parquet")
    assert refused.value.code == Code.BAD_SHARD


def test_storage_options_come_from_the_standard_aws_settings() -> None:
    settings = StorageSettings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert settings.options("s3://bucket/store/m") == {
        "aws_region": "eu-west-1",
        "aws_endpoint": "http://127.0.0.1:5000",
        "allow_http": "true",
    }
    assert StorageSettings.from_env({"AWS_REGION": "us-east-2"}).options("s3://b/p") == {"aws_region": "us-east-2"}
    assert settings.options("/tmp/store") == {}
    assert store_uri("out", "runs/a/", "ViT-B-32__openai") == "s3://out/runs/a/store/ViT-B-32__openai"


def test_shards_ingested_together_keep_the_newest_row_and_each_rows_shard(local_uri: str, tmp_path: Path) -> None:
    older, newer = tmp_path / "shard-00000.parquet", tmp_path / "shard-00001.parquet"
    vectors = unit_vectors(3, 8, seed=6)
    pq.write_table(shard(["cat.jpg", "dog.jpg"], vectors[:2]), older)
    pq.write_table(shard(["cat.jpg"], vectors[2:], etags="etag-2"), newer)  # cat re-uploaded and embedded again
    store = VectorStore(local_uri)

    result = ingest_shards(store, None, [str(older), str(newer)], still_current=trusting)

    assert result.ingested == Ingested(2, 0, 0, 0) and not result.refused
    np.testing.assert_allclose(stored(store, urls(["cat.jpg"])[0]), vectors[2])
    rows = table_of(store).to_arrow().sort_by("url")
    assert rows.column("shard").to_pylist() == [str(newer), str(older)]
    assert rows.column("etag").to_pylist() == ["etag-2", "etag-1"]
