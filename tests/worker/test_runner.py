"""The worker end to end on moto S3: real photos in, vectors, CloudEvents and Parquet out."""

from __future__ import annotations

import io
import json
import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from cloudevents.core.formats.json import JSONFormat

from clip_shared import keys
from clip_shared.manifest import ManifestEntry, ManifestError
from clip_worker.__main__ import main
from clip_worker.config import WorkerConfig
from clip_worker.labels import PROMPT, LabelSet, read_labels
from clip_worker.model import load
from clip_worker.runner import EXIT_FAILED, EXIT_OK, EXIT_RETRY, run
from tests import hostile
from tests.support import (
    AWKWARD_KEYS,
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    TINY_MODEL,
    all_formats,
    cosine,
    encode,
    photo,
    put_manifest,
    reference_embedding,
    stored_events,
    stored_vectors,
    tiny_worker_config,
    upload,
)


@pytest.fixture
def config(tiny_config: Path, tiny_checkpoint: Path) -> WorkerConfig:
    return tiny_worker_config(tiny_config, tiny_checkpoint)


def model_id(config: WorkerConfig) -> str:
    return load(config.model, config.pretrained, "cpu").id


def read_json(s3: Any, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())


def read_shard(s3: Any, url: str | None) -> Any:
    assert url is not None, "the run wrote no shard"
    bucket, key = keys.parse_s3_url(url)
    return pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def test_keys_with_url_characters_keep_their_own_outputs_and_failures(s3: Any, config: WorkerConfig) -> None:
    files = {key: encode(photo().rotate(n * 20), "PNG") for n, key in enumerate(AWKWARD_KEYS)}
    files["IMG #12.jpg"] = b"\xff\xd8\xff\xe0 not a whole JPEG"  # fails: named in the shard's metadata
    uri = put_manifest(s3, upload(s3, files))

    summary = run(replace(config, manifest_uri=uri), s3=s3)

    mid = model_id(config)
    assert set(stored_vectors(s3, mid)) == set(files) - {"IMG #12.jpg"}
    assert set(stored_events(s3, mid)) == set(files)
    shard = read_shard(s3, summary.shard_url)
    assert [keys.parse_s3_url(url) for url in shard.column("url").to_pylist()] == [
        (INPUT_BUCKET, key) for key in files if key != "IMG #12.jpg"
    ]
    assert json.loads(shard.schema.metadata[keys.SHARD_FAILED_METADATA]) == [keys.s3_url(INPUT_BUCKET, "IMG #12.jpg")]


def test_every_format_gets_a_unit_vector_matching_open_clip_and_a_cloudevent(s3: Any, config: WorkerConfig) -> None:
    formats = all_formats(photo())
    files = {f"photos/{name}": data for name, (data, _, _) in formats.items()}
    files["photos/with space/café ü.jpg"] = formats["photo.jpg"][0]
    uri = put_manifest(s3, upload(s3, files))

    summary = run(replace(config, manifest_uri=uri, job_id="job-123"), s3=s3)

    assert summary.exit_code == EXIT_OK
    assert (summary.progress.embedded, summary.progress.failed) == (len(files), 0)
    mid = model_id(config)
    vectors, events = stored_vectors(s3, mid), stored_events(s3, mid)
    assert set(vectors) == set(events) == set(files)
    for key in files:
        name = key.rsplit("/", 1)[-1]
        _, mime, seen = formats.get(name, formats["photo.jpg"])
        vector = vectors[key]
        assert vector.shape == (32,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        assert cosine(vector, reference_embedding(seen, TINY_MODEL, config.pretrained)) >= 0.999, key

        event = events[key]
        assert event["specversion"] == "1.0" and event["type"] == "document-created"
        assert event["id"] and event["time"] and event["source"]
        data = event["data"]
        assert (data["chainId"], data["jobId"]) == ("m-1", "job-123")  # put_manifest's manifest id
        assert data["source"] == data["document"]
        assert data["document"]["url"] == f"s3://{INPUT_BUCKET}/{key}"
        assert data["document"]["type"] == mime
        assert data["document"]["size"] == len(files[key])
        assert data["document"]["etag"]
        embeddings = data["metadata"]["properties"]["attrs"]["embeddings"]
        assert data["metadata"]["properties"]["kind"] == "image"
        # The vector is a row of the child's shard.
        assert embeddings == {
            "vectors": summary.shard_url,
            "model": TINY_MODEL,
            "pretrained": config.pretrained,
            "dimensions": 32,
        }
        # Without CLIP_LABELS the document has no keywords at all.
        assert set(data["metadata"]) == {"properties"} and set(data["metadata"]["properties"]["attrs"]) == {"embeddings"}

    # One shard and one events batch for the child, and nothing per object.
    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=OUTPUT_BUCKET)["Contents"]]
    assert sorted(key for key in listed if key.startswith(("parquet/", "events/"))) == [
        keys.events_key("", mid, "m-1", 0),
        keys.parquet_key("", mid, "m-1", 0),
    ]
    assert not [key for key in listed if key.startswith(("vectors/", "documents/"))]
    # Rows in manifest order, each with the ETag and time of the version read (the store keeps the newest).
    shard = read_shard(s3, summary.shard_url)
    assert shard.column("key").to_pylist() == list(files)
    heads = [s3.head_object(Bucket=INPUT_BUCKET, Key=key) for key in files]
    assert shard.column("etag").to_pylist() == [head["ETag"].strip('"') for head in heads]
    assert shard.column("last_modified").to_pylist() == [head["LastModified"] for head in heads]


def test_per_object_outputs_give_each_image_its_vector_and_event_too(s3: Any, config: WorkerConfig) -> None:
    files = {f"img-{i}.png": encode(photo().rotate(i * 40), "PNG") for i in range(3)}
    files["broken.png"] = files["img-0.png"][:300]
    uri = put_manifest(s3, upload(s3, files))

    summary = run(replace(config, manifest_uri=uri, per_object_outputs=True), s3=s3)

    assert summary.exit_code == EXIT_OK
    mid = model_id(config)
    vectors, events = stored_vectors(s3, mid), stored_events(s3, mid)
    for key in files:
        document = read_json(s3, keys.document_key("", mid, INPUT_BUCKET, key))
        JSONFormat().read(None, json.dumps(document))
        assert (document["type"], document["data"]) == (events[key]["type"], events[key]["data"])
        if key == "broken.png":
            assert document["data"]["error"]["code"] == "corrupt-image"
            continue
        stored = read_json(s3, keys.vector_key("", mid, INPUT_BUCKET, key))
        np.testing.assert_allclose(stored, vectors[key], rtol=1e-6)
        assert document["data"]["metadata"]["properties"]["attrs"]["embeddings"]["vectors"] == (
            f"s3://{OUTPUT_BUCKET}/{keys.vector_key('', mid, INPUT_BUCKET, key)}"
        )


def test_each_bad_input_gets_exactly_one_failure_and_the_rest_still_succeed(s3: Any, config: WorkerConfig) -> None:
    good = encode(photo(), "JPEG")
    files = {
        "ok.jpg": good,
        "truncated.jpg": good[: len(good) // 3],
        "noise.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "notes.jpg": b"a text file pretending to be a JPEG",
        "bomb.png": encode(photo().resize((2000, 2000)).convert("L"), "PNG"),
        "huge.bmp": encode(photo().resize((700, 700)), "BMP"),
    }
    entries = upload(s3, files)
    entries.append(ManifestEntry(bucket=INPUT_BUCKET, key="deleted.jpg", size=10, etag="x", mime_type="image/jpeg"))
    uri = put_manifest(s3, entries)

    limits = replace(config, manifest_uri=uri, max_image_pixels=1_000_000, max_object_bytes=1_000_000)
    summary = run(limits, s3=s3)

    assert summary.exit_code == EXIT_OK
    assert (summary.progress.embedded, summary.progress.failed) == (1, 6)
    expected = {
        "truncated.jpg": "corrupt-image",
        "noise.png": "corrupt-image",
        "notes.jpg": "unsupported-type",
        "bomb.png": "too-many-pixels",
        "huge.bmp": "object-too-large",
        "deleted.jpg": "object-not-found",
    }
    batch = json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=keys.events_key("", model_id(config), "m-1", 0))["Body"].read())
    assert len(batch) == len(expected) + 1
    events = stored_events(s3, model_id(config))
    for key, code in expected.items():
        assert events[key]["type"] == "document-failed"
        assert events[key]["data"]["error"]["code"] == code
        assert f"s3://{INPUT_BUCKET}/{key}" in events[key]["data"]["error"]["message"]
    assert events["ok.jpg"]["type"] == "document-created"
    assert read_shard(s3, summary.shard_url).column("key").to_pylist() == ["ok.jpg"]


def test_every_upload_too_costly_to_decode_fails_alone_and_the_photos_beside_it_are_embedded(
    s3: Any, config: WorkerConfig
) -> None:
    """The classes of hostile uploads of accepted types, each cheap in bytes: refused by a structure
    check, or stopped by the decoding budget (small here, to keep the test quick)."""
    hostiles = {
        "stray-byte-scan-bomb.jpg": hostile.scan_bomb(stray=b"\x00"),
        "stuffed-scan-bomb.jpg": hostile.scan_bomb(stray=b"\xff\x00\x7f\xff"),
        "arithmetic-scan-bomb.jpg": hostile.sequential_scan_bomb(0xC9),
        "app1-flood.jpg": hostile.app_flood(),
        "huge-tiles.tif": hostile.huge_tiles(),
        "many-strips.tif": hostile.many_strips(300_000),
        "end-of-lines.bmp": hostile.rle_end_of_lines(),
        "transparent.png": hostile.flat_rgba_png(),
        "chunk-flood.png": hostile.png_chunk_flood(),
    }
    photos = {f"photo-{index}.jpg": encode(photo().rotate(index * 90, expand=True), "JPEG") for index in range(3)}
    assert len(hostiles["huge-tiles.tif"]) == 146
    uri = put_manifest(s3, upload(s3, {**photos, **hostiles}))
    budget = replace(config, manifest_uri=uri, decode_cpu_s=1, decode_memory_mb=160, decode_wall_s=20)

    summary = run(budget, s3=s3)

    assert summary.exit_code == EXIT_OK
    events = stored_events(s3, model_id(config))
    assert {key: events[key]["data"].get("error", {}).get("code") for key in hostiles} == dict.fromkeys(hostiles, "too-costly")
    assert all(events[key]["type"] == "document-created" for key in photos)
    assert sorted(read_shard(s3, summary.shard_url).column("key").to_pylist()) == sorted(photos)


def test_a_child_near_the_job_timeout_writes_what_it_did_and_leaves_the_rest_to_the_next_attempt(
    s3: Any, config: WorkerConfig
) -> None:
    """Slow objects (each stopped at the decode deadline) keep the child busy past its time: it stops
    starting work, checkpoints, and exits for a retry; the last attempt records the rest as timed-out,
    so every object has an outcome or is in the next attempt's work."""
    # 2 s each on one helper: more than both attempts (12 s, then 4 s) can get through together.
    slow = {f"slow-{index}.bmp": hostile.rle_end_of_lines(9_000) for index in range(12)}
    photos = {"photo.jpg": encode(photo(), "JPEG")}
    uri = put_manifest(s3, upload(s3, {**photos, **slow}))
    timed = replace(config, manifest_uri=uri, decode_workers=1, io_threads=1, job_timeout_s=12, decode_wall_s=2, max_attempts=2)

    first = run(timed, s3=s3)

    assert first.exit_code == EXIT_RETRY
    events = stored_events(s3, model_id(config))
    assert events["photo.jpg"]["type"] == "document-created"
    left = set(slow) - set(events)
    assert left, "the child stopped before the end of its work"
    assert all(events[key]["data"]["error"]["code"] == "too-costly" for key in set(slow) & set(events))

    last = run(replace(timed, attempt=2, job_timeout_s=4), s3=s3)

    assert last.exit_code == EXIT_FAILED
    events = stored_events(s3, model_id(config))
    assert set(events) == set(photos) | set(slow)
    codes = {events[key]["data"]["error"]["code"] for key in slow}
    assert "timed-out" in codes and codes <= {"timed-out", "too-costly"}
    timed_out = next(events[key] for key in slow if events[key]["data"]["error"]["code"] == "timed-out")
    assert "retry --code timed-out" in timed_out["data"]["error"]["message"]


def test_array_children_cover_every_entry_exactly_once(s3: Any, config: WorkerConfig) -> None:
    files = {f"img-{i:02d}.png": encode(photo().rotate(i * 10), "PNG") for i in range(7)}
    uri = put_manifest(s3, upload(s3, files), shard_size=3)

    seen: list[str] = []
    for index in range(3):
        summary = run(replace(config, manifest_uri=uri, array_index=index), s3=s3)
        assert (summary.shard_url or "").endswith(f"shard-{index:05d}.parquet")
        seen += read_shard(s3, summary.shard_url).column("key").to_pylist()
    assert sorted(seen) == sorted(files)

    with pytest.raises(ManifestError, match="shard-00003.json"):
        run(replace(config, manifest_uri=uri, array_index=3), s3=s3)


def test_a_second_attempt_of_a_child_skips_what_it_finished(s3: Any, config: WorkerConfig) -> None:
    files = {f"img-{i}.png": encode(photo().rotate(i * 30), "PNG") for i in range(5)}
    files["broken.png"] = files["img-0.png"][:300]
    uri = put_manifest(s3, upload(s3, files))
    first = run(replace(config, manifest_uri=uri), s3=s3)
    assert (first.progress.embedded, first.progress.failed) == (5, 1)
    before = stored_events(s3, model_id(config))

    second = run(replace(config, manifest_uri=uri, attempt=2), s3=s3)

    assert (second.progress.embedded, second.progress.failed, second.progress.skipped) == (0, 0, 6)
    # Reused outcomes are the same events, not new ones; the shard still holds every vector.
    assert {key: event["id"] for key, event in stored_events(s3, model_id(config)).items()} == {
        key: event["id"] for key, event in before.items()
    }
    assert read_shard(s3, second.shard_url).equals(read_shard(s3, first.shard_url))


def test_with_a_label_set_each_created_event_lists_the_top_k_labels_of_its_stored_vector(s3: Any, config: WorkerConfig) -> None:
    # Five photos in batches of four: keywords come from a full batch and from the last, short one.
    names = ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    files = {f"photos/{name}": encode(photo(name), "PNG") for name in names}
    labels_uri = f"s3://{OUTPUT_BUCKET}/labels.txt"
    s3.put_object(Bucket=OUTPUT_BUCKET, Key="labels.txt", Body=b"cat\nastronaut\ncup of coffee\nrocket\nmotorcycle\nbeach\n")
    uri = put_manifest(s3, upload(s3, files))

    summary = run(replace(config, manifest_uri=uri, labels=labels_uri, keywords_top_k=3), s3=s3)

    assert (summary.exit_code, summary.progress.embedded) == (EXIT_OK, len(files))
    model = load(config.model, config.pretrained, "cpu")
    label_set = LabelSet.embed(model, read_labels(labels_uri, s3))
    vectors, events = stored_vectors(s3, model.id), stored_events(s3, model.id)
    for key in files:
        expected = label_set.top(vectors[key][np.newaxis], 3)[0]
        metadata = events[key]["data"]["metadata"]
        assert metadata["keywords"] == [label.label for label in expected], key
        attrs = metadata["properties"]["attrs"]
        assert attrs["zeroShot"] == {"prompt": PROMPT, "labelCount": 6}
        assert [item["label"] for item in attrs["keywords"]] == metadata["keywords"]
        for item, label in zip(attrs["keywords"], expected, strict=True):
            assert item["score"] == pytest.approx(label.score, abs=2e-6)
            assert item["probability"] == pytest.approx(label.probability, abs=2e-6)


def test_an_unreadable_label_set_fails_the_job_with_one_line_naming_it(
    s3: Any, config: WorkerConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    uri = put_manifest(s3, upload(s3, {"cat.png": encode(photo(), "PNG")}))
    missing = f"s3://{OUTPUT_BUCKET}/no-such-labels.txt"
    env = {
        "MANIFEST_URI": uri,
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "CLIP_MODEL": config.model,
        "CLIP_MODEL_CONFIG": str(config.model_config_path),
        "CLIP_PRETRAINED": config.pretrained,
        "DEVICE": "cpu",
        "CLIP_LABELS": missing,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert main() == EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() installs its own handler

    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].startswith(f"cannot read the label set {missing}: "), errors
    assert not s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="events/").get("KeyCount")
