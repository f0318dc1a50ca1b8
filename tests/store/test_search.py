from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest

from clip_store import database, recall
from clip_store.maintain import MIN_SAMPLE_RATE, Action, IndexPolicy, maintain, plan, sample_rate
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


def test_a_deferred_training_still_compacts_the_files_that_pile_up_until_the_job_runs(local_uri: str) -> None:
    store = VectorStore(local_uri)
    vectors = clustered(2_400, DIMENSIONS, seed=31)
    for part in range(8):
        rows = slice(part * 300, (part + 1) * 300)
        store.ingest(shard(names(rows.start, 300), vectors[rows]), shard=f"s{part}", still_current=trusting)
    limited = replace(POLICY, max_train_rows=1_000, max_fragments=4)

    done = maintain(store, limited)

    assert (done.action, done.deferred, done.state.index_type) == (Action.COMPACT, Action.BUILD, None)
    assert done.state.fragments < 4 and done.state.rows == 2_400
    assert urls(names(2_399, 1))[0] == store.nearest(vectors[2_399], 1)[0].url


#: Many small partitions, so that probing few of them misses neighbours and the ladder has rungs to climb.
TUNED = replace(POLICY, max_unindexed=10_000, rows_per_partition=100)


def text_like(count: int, seed: int, gap: float = 0.8) -> np.ndarray:
    """Queries out of the images' distribution, as CLIP's text vectors are: the images' clusters
    seen from another cone (a shared offset), so their neighbours straddle partitions."""
    offset = unit_vectors(1, DIMENSIONS, seed=99)[0]
    vectors = clustered(count, DIMENSIONS, seed=seed) + gap * offset
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def recall_at(store: VectorStore, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    hits = 0
    for query in queries:
        truth = set(urls(names(0, len(vectors)))[int(i)] for i in brute_force(vectors, query, k))
        hits += len(truth & {match.url for match in store.nearest(query, k)})
    return hits / (k * len(queries))


def test_a_build_measures_recall_on_images_and_texts_and_readers_reach_it(local_uri: str) -> None:
    vectors = clustered(2_100, DIMENSIONS, seed=20)
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_100), vectors), shard="a", still_current=trusting)
    asked = []

    def texts() -> np.ndarray:
        asked.append(1)
        return text_like(60, seed=21)

    built = maintain(store, TUNED, text_probes=texts)

    tuning = built.state.tuning
    assert built.measured and tuning is not None and tuning.reached and asked == [1]
    assert set(tuning.recall) == {"images", "shifted", "blurred", "texts"} and min(tuning.recall.values()) >= 0.98
    assert (tuning.rows, tuning.probes, tuning.k, tuning.target) == (2_100, 200, 10, 0.98)
    # What the measurement promised holds for queries it never saw, through a reader's defaults.
    reader = VectorStore(local_uri, refresh_s=None)
    assert recall_at(reader, vectors, text_like(40, seed=22)) >= 0.95
    assert recall_at(reader, vectors, clustered(40, DIMENSIONS, seed=23)) >= 0.95
    # Nothing grew: the next upkeep neither measures again nor asks for text probes.
    again = maintain(store, TUNED, text_probes=texts)
    assert (again.action, again.measured, asked) == (Action.NONE, False, [1])


def test_readers_search_with_the_recorded_settings_and_explicit_ones_win(local_uri: str) -> None:
    vectors = clustered(2_100, DIMENSIONS, seed=24)
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_100), vectors), shard="a", still_current=trusting)
    maintain(store, TUNED)
    table = store.table()
    assert table is not None
    recorded = store.index_state().tuning
    assert recorded is not None
    recall.record(table, replace(recorded, nprobes=1, refine_factor=1))
    queries = text_like(20, seed=25)

    def answers(search: SearchSettings) -> list[list[str]]:
        reader = VectorStore(local_uri, refresh_s=None, search=search)
        return [[match.url for match in reader.nearest(query, 10)] for query in queries]

    cheap, thorough = answers(SearchSettings(nprobes=1, refine_factor=1)), answers(SearchSettings(nprobes=21, refine_factor=100))
    assert cheap != thorough  # else this test could not tell the settings apart
    assert answers(SearchSettings()) == cheap
    assert answers(SearchSettings(nprobes=21, refine_factor=100)) == thorough
    # A record this code cannot read (another version's) is searched as unmeasured, never a failed query.
    table.update_field_metadata({"path": "vector", "metadata": {recall.TUNING: "{not json"}})
    assert answers(SearchSettings()) == answers(SearchSettings(*recall.UNMEASURED))
    assert store.index_state().tuning is None and plan(store.index_state(), TUNED) is Action.MEASURE


def test_text_probes_of_another_models_width_are_left_out_not_a_failed_upkeep(local_uri: str) -> None:
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_100), clustered(2_100, DIMENSIONS, seed=28)), shard="a", still_current=trusting)

    done = maintain(store, TUNED, text_probes=lambda: unit_vectors(30, DIMENSIONS * 2, seed=29))

    assert done.state.tuning is not None and set(done.state.tuning.recall) == {"images", "shifted", "blurred"}


def test_a_store_given_no_text_probes_still_holds_its_recall_for_queries_from_another_cone(local_uri: str) -> None:
    vectors = clustered(2_100, DIMENSIONS, seed=30)
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_100), vectors), shard="a", still_current=trusting)
    policy = replace(TUNED, recall=recall.RecallPolicy(nprobes=(1, 2, 5, 10)))

    done = maintain(store, policy)  # as a user of the library would: no text vectors at hand

    tuning = done.state.tuning
    assert tuning is not None and tuning.reached and set(tuning.recall) == {"images", "shifted", "blurred"}
    # LanceDB's k-means is not seeded: the partitions, and so the settings chosen, vary from run to run.
    texts, images = text_like(40, seed=32, gap=2.0), clustered(40, DIMENSIONS, seed=31)
    reader = VectorStore(local_uri, refresh_s=None)
    assert recall_at(reader, vectors, texts) >= 0.95 and recall_at(reader, vectors, images) >= 0.98
    # Measured on images alone, the store would have settled for settings at which those texts miss.
    images_only = next(n for n in policy.recall.nprobes if recall_at(searching(local_uri, n), vectors, images) >= 0.98)
    farther = text_like(40, seed=32, gap=3.0)
    assert images_only < tuning.nprobes and recall_at(searching(local_uri, images_only), vectors, farther) < 0.95


def searching(local_uri: str, nprobes: int) -> VectorStore:
    return VectorStore(local_uri, refresh_s=None, search=SearchSettings(nprobes=nprobes, refine_factor=max(recall.REFINE)))


def test_a_target_no_setting_reaches_is_recorded_as_not_reached_with_the_most_thorough_settings(
    local_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_100), clustered(2_100, DIMENSIONS, seed=26)), shard="a", still_current=trusting)

    with caplog.at_level(logging.INFO, logger="clip_store"):
        done = maintain(store, replace(TUNED, recall=recall.RecallPolicy(target=1.01, probes=50)))

    tuning = done.state.tuning
    assert tuning is not None and not tuning.reached and tuning.probes == 50
    assert (tuning.nprobes, tuning.refine_factor) == (21, max(recall.REFINE))
    # Each setting stops at the first kind that misses, but what is recorded says how every kind did.
    assert set(tuning.recall) == {"images", "shifted", "blurred"}
    tried = [record.getMessage() for record in caplog.records if record.name == "clip_store.recall"]
    assert len(tried) == len(recall.probe_counts(recall.NPROBES, 21)) + 1 and "nprobes 21, refine 50" in tried[-1]


def test_recall_is_measured_again_as_the_table_grows_and_left_to_the_trainer_past_its_bound(local_uri: str) -> None:
    store = VectorStore(local_uri)
    vectors = clustered(3_000, DIMENSIONS, seed=27)
    store.ingest(shard(names(0, 2_100), vectors[:2_100]), shard="a", still_current=trusting)
    maintain(store, TUNED)
    store.ingest(shard(names(2_100, 400), vectors[2_100:2_500]), shard="b", still_current=trusting)
    assert plan(store.index_state(), TUNED) is Action.NONE  # 2,500 < 1.25 x 2,100

    store.ingest(shard(names(2_500, 500), vectors[2_500:]), shard="c", still_current=trusting)
    assert plan(store.index_state(), TUNED) is Action.MEASURE
    limited = maintain(store, replace(TUNED, max_train_rows=2_900))
    assert (limited.action, limited.deferred, limited.measured) == (Action.NONE, Action.MEASURE, False)
    remeasured = maintain(store, TUNED)
    assert remeasured.measured and remeasured.state.tuning is not None and remeasured.state.tuning.rows == 3_000


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


def test_the_k_means_sample_stays_within_its_cap_at_any_size() -> None:
    policy = IndexPolicy()  # 4,096 rows a partition, 2M rows of sample at most
    assert sample_rate(1_000_000, policy) == 256  # LanceDB's own below the cap
    assert sample_rate(100_000_000, policy) == 81  # 24,414 partitions: 1.98M rows, not 6.25M
    assert sample_rate(10_000_000_000, policy) == MIN_SAMPLE_RATE  # never too few rows a centroid
    for rows in (4_096, 10_000_000, 40_960_000, 100_000_000, 163_840_000):
        partitions = rows // policy.rows_per_partition
        assert partitions * sample_rate(rows, policy) <= max(policy.max_train_sample, partitions * MIN_SAMPLE_RATE)


def test_an_index_of_100m_rows_is_probed_in_doubling_steps_before_all_of_its_partitions() -> None:
    partitions = recall.partitions_of(100_000_000, IndexPolicy().rows_per_partition)

    counts = recall.probe_counts(recall.NPROBES, partitions)

    # A store that needs a quarter of them (text-like queries, 10M of clip_like) is not searched on all.
    assert counts[-3:] == [10_240, 20_480, partitions] and counts[0] == 10
    assert all(later == 2 * earlier for earlier, later in zip(counts, counts[1:-1], strict=False))


def test_an_index_of_other_codes_than_the_policys_is_retrained_once(local_uri: str) -> None:
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_100), clustered(2_100, DIMENSIONS, seed=33)), shard="a", still_current=trusting)
    maintain(store, replace(TUNED, code_bits=1))  # as every index was built before issue 21
    assert store.index_state().code_bits == 1

    retrained = maintain(store, TUNED)

    assert (retrained.action, retrained.state.code_bits, retrained.measured) == (Action.RETRAIN, TUNED.code_bits, True)
    assert maintain(store, TUNED).action is Action.NONE  # once


def test_one_image_stored_under_many_keys_does_not_count_as_missed_recall(local_uri: str) -> None:
    vectors = clustered(2_100, DIMENSIONS, seed=34)
    vectors[::7] = vectors[0]  # a placeholder image uploaded under 300 keys: any 10 of them are a right answer
    store = VectorStore(local_uri)
    store.ingest(shard(names(0, 2_100), vectors), shard="a", still_current=trusting)

    tuning = maintain(store, TUNED).state.tuning

    assert tuning is not None and tuning.reached and tuning.recall["images"] >= 0.98
    placeholder = [match.url for match in VectorStore(local_uri, refresh_s=None).nearest(vectors[0], 10)]
    assert len(placeholder) == 10 and set(placeholder) <= set(urls(names(0, 2_100))[::7])


def test_a_reader_keeps_no_more_of_the_index_than_its_cache_bound_and_finds_the_same(local_uri: str) -> None:
    store = VectorStore(local_uri)
    vectors = clustered(20_000, 64, seed=4)
    store.ingest(shard(names(0, 20_000), vectors), shard="s", still_current=trusting)
    assert maintain(store, POLICY).action is Action.BUILD
    queries = clustered(20, 64, seed=5)

    kept, found = {}, {}
    # Bounds no other test uses: each reader has its process-wide cache to itself. The index is ~1.3 MB.
    for bound in (40_001, 64 * 2**20 + 1):
        reader = VectorStore(local_uri, index_cache_bytes=bound)
        reader.prewarm()
        found[bound] = [[match.url for match in reader.nearest(query, 10)] for query in queries]
        kept[bound] = database.session(bound).size_bytes

    assert found[40_001] == found[64 * 2**20 + 1]
    # The tight reader's cache stays near its bound (and its metadata); the roomy one holds the whole index.
    assert kept[40_001] < 150_000 and kept[64 * 2**20 + 1] > 1_000_000
