"""Two writers, ties and churn: what the store guarantees whatever the interleaving (docs/search.md,
"Consistency"), on moto's S3 with a versioned input bucket and two store objects as two indexer
containers would hold them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
import requests
from lancedb.table import LanceTable

from clip_store import IndexPolicy, S3Lease, VectorStore, maintain, s3_still_current, store_uri
from clip_store.maintain import Action
from clip_store.store import fragment_count
from clip_store.tombstones import TABLE as TOMBSTONES
from tests.store.support import shard, stored, table_of, tombstone_count, trusting, unit_vectors, urls
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET


@pytest.fixture
def versioned(s3_endpoint: str) -> Iterator[Any]:
    s3 = boto3.client("s3")
    s3.put_bucket_versioning(Bucket=INPUT_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    yield s3
    # moto keeps its buckets in the process, whichever server serves them: leave none for the next test.
    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=30)


def put(s3: Any, key: str, body: bytes) -> str:
    return str(s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=body)["ETag"]).strip('"')


def between_read_and_commit(store: VectorStore, meanwhile: Callable[[], object]) -> None:
    """Runs `meanwhile` (the other container's work) after `store`'s next ingest has read what it checks
    and before its merge commits: the window a second writer's removal can fall in."""
    table = table_of(store)
    merge_insert = table.merge_insert

    def late(*args: Any, **kwargs: Any) -> Any:
        meanwhile()
        table.merge_insert = merge_insert  # type: ignore[method-assign]  # once: restore the library's own method
        return merge_insert(*args, **kwargs)

    table.merge_insert = late  # type: ignore[method-assign]  # the one seam where two containers interleave


def test_a_removal_between_anothers_check_and_commit_is_never_lost(versioned: Any) -> None:
    uri = store_uri(OUTPUT_BUCKET, "", "m")
    x, y = VectorStore(uri), VectorStore(uri)
    etags = [put(versioned, name, name.encode()) for name in ("keep.jpg", "gone.jpg")]
    x.ingest(shard(["keep.jpg"], unit_vectors(1, 8, seed=1), etags=etags[:1]), shard="a", still_current=trusting)

    def y_removes_gone() -> None:
        versioned.delete_object(Bucket=INPUT_BUCKET, Key="gone.jpg")
        assert y.delete(urls(["gone.jpg"])) == 0  # nothing to remove yet: x has not committed

    between_read_and_commit(x, y_removes_gone)
    late = x.ingest(
        shard(["gone.jpg"], unit_vectors(1, 8, seed=2), etags=etags[1:]), shard="b", still_current=s3_still_current(versioned)
    )

    assert late.skipped_deleted == 1
    assert [row for row in table_of(x).to_arrow().column("url").to_pylist()] == urls(["keep.jpg"])


def test_a_newer_removal_is_not_cleared_by_an_ingest_that_saw_the_older_one(versioned: Any) -> None:
    uri = store_uri(OUTPUT_BUCKET, "", "m")
    x, y = VectorStore(uri), VectorStore(uri)
    put(versioned, "cat.jpg", b"first")
    y.delete(urls(["cat.jpg"]))  # an earlier removal: its tombstone stands
    again = put(versioned, "cat.jpg", b"uploaded again")  # ...and the object came back

    def y_removes_it_again() -> None:
        versioned.delete_object(Bucket=INPUT_BUCKET, Key="cat.jpg")
        y.delete(urls(["cat.jpg"]))

    x.ingest(shard(["dog.jpg"], unit_vectors(1, 8, seed=3)), shard="a", still_current=trusting)  # the table exists
    between_read_and_commit(x, y_removes_it_again)
    x.ingest(shard(["cat.jpg"], unit_vectors(1, 8, seed=4), etags=again), shard="b", still_current=s3_still_current(versioned))

    assert x.vector_of(urls(["cat.jpg"])[0]) is None
    assert tombstone_count(x) == 1  # the newer tombstone stays, for the next late shard


@pytest.mark.parametrize("order", ["newer first", "older first", "one batch"])
def test_two_uploads_within_a_second_keep_the_one_s3_says_is_current(versioned: Any, order: str) -> None:
    store = VectorStore(store_uri(OUTPUT_BUCKET, "", "m"))
    older, newer = put(versioned, "cat.jpg", b"first"), put(versioned, "cat.jpg", b"second")
    second = datetime(2026, 12, 6, 9, 0, 0, tzinfo=UTC)  # S3's LastModified is kept to the second: a tie
    vectors = unit_vectors(2, 8, seed=5)
    rows = {etag: shard(["cat.jpg"], vectors[n : n + 1], etags=etag, modified=[second]) for n, etag in enumerate((older, newer))}
    still_current = s3_still_current(versioned)

    if order == "one batch":
        import pyarrow as pa

        store.ingest(pa.concat_tables([rows[newer], rows[older]]), shard="ab", still_current=still_current)
    else:
        first, then = (newer, older) if order == "newer first" else (older, newer)
        store.ingest(rows[first], shard="a", still_current=still_current)
        store.ingest(rows[then], shard="b", still_current=still_current)

    assert table_of(store).to_arrow().column("etag").to_pylist() == [newer]
    assert stored(store, urls(["cat.jpg"])[0]).tolist() == pytest.approx(vectors[1].tolist())


def test_a_store_kept_small_by_churn_stays_as_compact_as_a_fresh_one(local_uri: str) -> None:
    store = VectorStore(local_uri)
    policy = IndexPolicy()
    actions = []
    batches = 3 * policy.max_fragments
    for n in range(batches):  # many small batches, each adding two rows and removing one of the last batch's
        store.ingest(shard([f"{n}a.jpg", f"{n}b.jpg"], unit_vectors(2, 8, seed=n)), shard=f"s{n}", still_current=trusting)
        if n:
            store.delete(urls([f"{n - 1}a.jpg"]))
        actions.append(maintain(store, policy).action)

    tombstones: LanceTable | None = store.tombstones.database.table(TOMBSTONES)
    assert tombstones is not None
    assert fragment_count(table_of(store)) < policy.max_fragments and fragment_count(tombstones) < policy.max_fragments
    assert actions.count(Action.COMPACT) >= 2 and store.count() == batches + 1


def test_one_caller_trains_an_index_at_a_time_and_a_dead_holders_lease_expires(versioned: Any, local_uri: str) -> None:
    store = VectorStore(local_uri)
    store.ingest(shard([f"{n}.jpg" for n in range(2_000)], unit_vectors(2_000, 32, seed=1)), shard="s", still_current=trusting)
    policy = IndexPolicy(exact_below=2_000, rows_per_partition=500)
    url = f"s3://{OUTPUT_BUCKET}/store/m/_training.lease"

    with S3Lease(versioned, url).hold() as training:  # another indexer container trains this index
        assert training
        meanwhile = maintain(store, policy, S3Lease(versioned, url))
        assert (meanwhile.action, meanwhile.busy, store.index_state().index_type) == (Action.NONE, True, None)

    done = maintain(store, policy, S3Lease(versioned, url))
    assert (done.action, done.busy, done.state.index_type) == (Action.BUILD, False, "IVF_RQ")
    assert versioned.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="store/m/").get("KeyCount") == 0  # released

    # A holder that died keeps its lease until the time-to-live; then one of the next callers takes it.
    dead = S3Lease(versioned, url).hold()
    assert dead.__enter__()
    with S3Lease(versioned, url).hold() as live, S3Lease(versioned, url, ttl=timedelta(0)).hold() as after_ttl:
        assert (live, after_ttl) == (False, True)


def test_churn_after_the_index_exists_keeps_its_files_and_segments_few(local_uri: str) -> None:
    store = VectorStore(local_uri)
    store.ingest(shard([f"{n}.jpg" for n in range(2_000)], unit_vectors(2_000, 32, seed=1)), shard="s", still_current=trusting)
    policy = IndexPolicy(exact_below=2_000, rows_per_partition=500)
    assert maintain(store, policy).action is Action.BUILD
    states = []
    for n in range(10 * policy.max_fragments):  # each update adds an index segment; files under two never merge
        store.ingest(shard([f"x{n}a.jpg", f"x{n}b.jpg"], unit_vectors(2, 32, seed=n + 5)), shard=f"b{n}", still_current=trusting)
        if n:
            store.delete(urls([f"x{n - 1}a.jpg"]))
        states.append(maintain(store, policy))

    assert max(done.state.fragments for done in states) <= 2 * policy.max_fragments
    assert max(done.state.index_segments for done in states) <= policy.max_fragments
    assert any(done.action is Action.RETRAIN for done in states)  # the retrain that merged the segments


def test_many_tombstones_are_looked_up_through_an_index(local_uri: str) -> None:
    store = VectorStore(local_uri)
    policy = IndexPolicy(exact_below=500, max_fragments=2)
    for part in range(3):
        store.delete(urls([f"gone/{part}-{n}.jpg" for n in range(300)]))
    maintain(store, policy)

    tombstones: LanceTable | None = store.tombstones.database.table(TOMBSTONES)
    assert tombstones is not None and [index.columns for index in tombstones.list_indices()] == [["url"]]
    assert set(store.tombstones.of(urls(["gone/1-7.jpg", "kept.jpg"]))) == set(urls(["gone/1-7.jpg"]))


@pytest.mark.parametrize("current_first", [True, False])
def test_a_tie_between_two_writers_keeps_the_version_s3_says_is_current(versioned: Any, current_first: bool) -> None:
    uri = store_uri(OUTPUT_BUCKET, "", "m")
    x, y = VectorStore(uri), VectorStore(uri)
    x.ingest(shard(["dog.jpg"], unit_vectors(1, 8, seed=3)), shard="a", still_current=trusting)  # the table exists
    older, newer = put(versioned, "cat.jpg", b"first"), put(versioned, "cat.jpg", b"second")
    second = datetime(2026, 12, 6, 9, 0, 0, tzinfo=UTC)  # S3's LastModified, kept to the second: a tie
    vectors = unit_vectors(2, 8, seed=5)
    rows = {etag: shard(["cat.jpg"], vectors[n : n + 1], etags=etag, modified=[second]) for n, etag in enumerate((older, newer))}
    still_current = s3_still_current(versioned)
    mine, theirs = (older, newer) if current_first else (newer, older)

    # The other container commits its version of the url while this one's ingest is between read and commit.
    between_read_and_commit(x, lambda: y.ingest(rows[theirs], shard="b", still_current=still_current))
    x.ingest(rows[mine], shard="a", still_current=still_current)

    stored_rows = table_of(x).to_arrow()
    assert (
        dict(zip(stored_rows.column("url").to_pylist(), stored_rows.column("etag").to_pylist(), strict=True))[
            urls(["cat.jpg"])[0]
        ]
        == newer
    )
