from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest

from clip_store.maintain import Action, IndexPolicy, maintain, plan
from clip_store.store import Ingested, SearchSettings, VectorStore
from tests.store.support import clustered, shard, stored, tombstone_count, trusting, unit_vectors, urls

DIMENSIONS = 32
#: Small enough for a test: an index over 2,000 rows, updated every 300 new ones.
POLICY = IndexPolicy(exact_below=2_000, max_unindexed=300, retrain_growth=2.0, rows_per_partition=500)


def names(start: int, count: int) -> list[str]:
    return [f"images/{i:05d}.jpg" for i in range(start, start + count)]


def brute_force(vectors: np.ndarray, query: np.ndarray, top: int) -> list[int]:
    return list(np.argsort(-(vectors @ (query / np.linalg.norm(query))), kind="stable")[:top])


def test_an_unindexed_search_is_exactly_brute_force(local_uri: str) -> None:
    store = VectorStore(local_uri)
    vectors = unit_vectors(1_500, DIMENSIONS, seed=1)
    store.ingest(shard(names(0, 1_500), vectors), shard="s", still_current=trusting)

    for query in unit_vectors(5, DIMENSIONS, seed=2) * 3:  # not unit length: the store normalises
        matches = store.nearest(query, 10)
        expected = brute_force(vectors, query, 10)
        assert [match.url for match in matches] == [urls(names(int(i), 1))[0] for i in expected]
        np.testing.assert_allclose(
            [match.score for match in matches], vectors[expected] @ (query / np.linalg.norm(query)), atol=1e-5
        )


def test_the_index_is_built_past_the_threshold_and_later_rows_are_found_before_and_after_its_update(local_uri: str) -> None:
    # 32-d RaBitQ codes are 32 bits: re-rank more candidates than 512-d needs, or a row's own vector may miss it.
    store = VectorStore(local_uri, search=SearchSettings(refine_factor=100))
    vectors = clustered(2_400, DIMENSIONS, seed=3)
    store.ingest(shard(names(0, 1_900), vectors[:1_900]), shard="a", still_current=trusting)
    assert maintain(store, POLICY).action is Action.NONE and store.index_state().index_type is None

    store.ingest(shard(names(1_900, 200), vectors[1_900:2_100]), shard="b", still_current=trusting)
    built = maintain(store, POLICY)
    assert built.action is Action.BUILD
    assert (built.state.index_type, built.state.indexed_rows, built.state.trained_rows) == ("IVF_RQ", 2_100, 2_100)
    assert maintain(store, POLICY).action is Action.NONE  # nothing to do: nothing done

    store.ingest(shard(names(2_100, 300), vectors[2_100:]), shard="c", still_current=trusting)
    assert store.index_state().unindexed_rows == 300
    newest = urls(names(2_399, 1))[0]
    assert store.nearest(vectors[2_399], 1)[0].url == newest  # found by the exact scan of unindexed rows

    updated = maintain(store, POLICY)
    assert updated.action is Action.UPDATE and (updated.state.indexed_rows, updated.state.unindexed_rows) == (2_400, 0)
    assert store.nearest(vectors[2_399], 1)[0].url == newest
    # The url index the build added answers `similar`'s lookup of rows added after it too.
    np.testing.assert_allclose(stored(store, newest), vectors[2_399])


def test_indexed_search_finds_what_brute_force_finds_on_clustered_vectors(local_uri: str) -> None:
    store = VectorStore(local_uri)
    vectors = clustered(3_000, DIMENSIONS, seed=4)
    store.ingest(shard(names(0, 3_000), vectors), shard="s", still_current=trusting)
    assert maintain(store, POLICY).action is Action.BUILD

    queries = clustered(20, DIMENSIONS, seed=5)
    store.prewarm()
    found = [{match.url for match in store.nearest(query, 10)} for query in queries]
    expected = [{urls(names(int(i), 1))[0] for i in brute_force(vectors, query, 10)} for query in queries]
    recall = np.mean([len(f & e) / 10 for f, e in zip(found, expected, strict=True)])
    assert recall >= 0.98
    # Refined: the scores are the exact cosines of the rows returned.
    top = store.nearest(queries[0], 3)
    np.testing.assert_allclose([m.score for m in top], [float(stored(store, m.url) @ queries[0]) for m in top], atol=1e-5)


def outgrown(local_uri: str) -> tuple[VectorStore, np.ndarray]:
    """A store whose index was trained on 2,100 rows and which now holds 4,400: a retrain is due."""
    store = VectorStore(local_uri)
    vectors = clustered(4_400, DIMENSIONS, seed=6)
    store.ingest(shard(names(0, 2_100), vectors[:2_100]), shard="a", still_current=trusting)
    maintain(store, POLICY)
    store.ingest(shard(names(2_100, 2_300), vectors[2_100:]), shard="b", still_current=trusting)
    return store, vectors


def test_the_index_is_retrained_once_the_table_outgrows_it(local_uri: str) -> None:
    store, _ = outgrown(local_uri)
    assert plan(store.index_state(), POLICY) is Action.RETRAIN

    retrained = maintain(store, POLICY)
    assert retrained.action is Action.RETRAIN
    assert (retrained.state.trained_rows, retrained.state.indexed_rows, retrained.state.unindexed_rows) == (4_400, 4_400, 0)


def test_a_retrain_past_max_train_rows_is_deferred_while_new_rows_still_go_into_the_index(local_uri: str) -> None:
    store, vectors = outgrown(local_uri)
    limited = replace(POLICY, max_train_rows=3_000)

    deferred = maintain(store, limited)
    assert (deferred.action, deferred.deferred) == (Action.UPDATE, Action.RETRAIN)
    assert (deferred.state.trained_rows, deferred.state.indexed_rows, deferred.state.unindexed_rows) == (2_100, 4_400, 0)
    assert urls(names(4_399, 1))[0] in [match.url for match in store.nearest(vectors[4_399], 10)]
    # Nothing more to fold in: the retrain stays due, and nothing is done until a process without the limit runs.
    assert (maintain(store, limited).action, maintain(store, limited).deferred) == (Action.NONE, Action.RETRAIN)

    retrained = maintain(store, POLICY)
    assert (retrained.action, retrained.deferred, retrained.state.trained_rows) == (Action.RETRAIN, None, 4_400)


def test_search_settings_follow_the_tables_size_unless_they_are_given() -> None:
    chosen = SearchSettings()
    # The sizes measured (docs/benchmarks.md), and between and past them.
    assert [chosen.for_rows(rows) for rows in (5_000, 1_000_000, 2_000_000, 10_000_000)] == [
        (20, 20),
        (20, 20),
        (80, 20),
        (320, 50),
    ]
    assert (chosen.for_rows(1_500_000), chosen.for_rows(6_000_000), chosen.for_rows(20_000_000)) == (
        (50, 20),
        (200, 50),
        (640, 50),
    )
    probes = [chosen.for_rows(rows) for rows in range(0, 30_000_001, 250_000)]
    assert probes == sorted(probes)  # never less work, so never less recall, for a bigger table
    assert SearchSettings(nprobes=7).for_rows(10_000_000) == (7, 50)
    assert SearchSettings(nprobes=7, refine_factor=3).for_rows(10) == (7, 3)


def test_similar_leaves_out_the_image_asked_about(local_uri: str) -> None:
    store = VectorStore(local_uri)
    vectors = unit_vectors(50, DIMENSIONS, seed=7)
    store.ingest(shard(names(0, 50), vectors), shard="s", still_current=trusting)
    url = urls(names(7, 1))[0]
    vector = store.vector_of(url)
    assert vector is not None

    matches = store.nearest(vector, 5, exclude=[url])

    assert len(matches) == 5 and url not in [match.url for match in matches]
    assert [match.url for match in matches] == [urls(names(int(i), 1))[0] for i in brute_force(vectors, vector, 6)[1:]]


def test_an_empty_or_missing_store_answers_nothing(local_uri: str) -> None:
    store = VectorStore(local_uri, refresh_s=None)
    assert store.count() == 0 and store.nearest(np.ones(DIMENSIONS, np.float32), 10) == []
    assert store.vector_of("s3://in/a.jpg") is None and maintain(store).action is Action.NONE
    store.prewarm()  # nothing to read yet: a reader's start must not fail on an empty bucket


@pytest.mark.parametrize("refresh_s", [0, 3600])
def test_a_reader_sees_new_rows_within_its_refresh_interval(local_uri: str, refresh_s: int) -> None:
    writer = VectorStore(local_uri)
    vectors = unit_vectors(2, DIMENSIONS, seed=8)
    writer.ingest(shard(names(0, 1), vectors[:1]), shard="a", still_current=trusting)
    reader = VectorStore(local_uri, refresh_s=refresh_s)
    assert reader.count() == 1

    assert writer.ingest(shard(names(1, 1), vectors[1:]), shard="b", still_current=trusting) == Ingested(1, 0, 0, 0)

    assert reader.count() == (2 if refresh_s == 0 else 1)
    [match] = reader.nearest(vectors[1], 1)
    seen = 1 if refresh_s == 0 else 0  # the new row itself, or the best of what the reader still has
    assert (match.url, match.score) == (urls(names(seen, 1))[0], pytest.approx(float(vectors[seen] @ vectors[1]), abs=1e-5))


def test_an_index_update_forgets_tombstones_older_than_the_policy_keeps_them(local_uri: str) -> None:
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_000), clustered(2_000, DIMENSIONS, seed=9)), shard="a", still_current=trusting)
    maintain(store, POLICY)
    store.delete(urls(names(0, 1)))
    store.ingest(shard(names(2_000, 300), clustered(300, DIMENSIONS, seed=10)), shard="b", still_current=trusting)

    kept = maintain(store, POLICY)  # tombstones younger than 15 days stay
    assert kept.action is Action.UPDATE and tombstone_count(store) == 1
    store.ingest(shard(names(2_300, 300), clustered(300, DIMENSIONS, seed=11)), shard="c", still_current=trusting)
    assert maintain(store, replace(POLICY, keep_tombstones=timedelta(0))).action is Action.UPDATE

    assert tombstone_count(store) == 0
    assert store.vector_of(urls(names(0, 1))[0]) is None and store.count() == 2_599
