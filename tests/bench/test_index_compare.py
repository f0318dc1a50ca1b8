from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import index_compare


def test_text_like_queries_sit_in_another_cone_than_the_images() -> None:
    for mixture, chunks in index_compare.MIXTURES.items():
        stored = next(chunks(2_000, 64, 1))
        queries = index_compare.queries_of(mixture, 200, 64)
        common = stored.mean(axis=0) / np.linalg.norm(stored.mean(axis=0))
        for kind in ("texts", "concepts"):
            # The modality gap: far less of the images' common direction than the images have.
            assert (queries[kind] @ common).mean() < 0.6 * (queries["images"] @ common).mean(), (mixture, kind)
            assert np.allclose(np.linalg.norm(queries[kind], axis=1), 1, atol=1e-5)


def test_each_index_finds_its_cheapest_settings_on_both_mixtures_and_every_kind_of_query(tmp_path: Path) -> None:
    results = index_compare.main(
        ["--rows", "6000", "--dimensions", "16", "--queries", "20", "--indexes", "rq-100-4", "--json", str(tmp_path / "c.json")]
    )

    assert [(run["mixture"], run["index"]) for run in results["runs"]] == [("clip_like", "rq-100-4"), ("lognormal", "rq-100-4")]
    stopped_early = 0
    for run in results["runs"]:
        tried, chosen = run["tried"], run["chosen"]
        settings = [(rung["nprobes"], rung["refine_factor"]) for rung in tried]
        assert (chosen["nprobes"], chosen["refine_factor"]) in settings
        # The chosen settings are timed one query at a time for every kind.
        assert all(0 <= chosen[f"{kind}_recall"] <= 1 and chosen[f"{kind}_p95_ms"] > 0 for kind in index_compare.KINDS)
        for rung in tried:
            # Hardest kind first, and a setting stops at the first kind that misses the target.
            measured = [kind for kind in index_compare.KINDS if f"{kind}_recall" in rung]
            assert measured == list(index_compare.KINDS[: len(measured)]) and measured
            assert all(rung[f"{kind}_recall"] >= results["target"] for kind in measured[:-1])
            stopped_early += len(measured) < len(index_compare.KINDS)
        # Probing every partition and re-ranking 50 x k candidates finds what the exact scan finds at 16-d.
        assert max(rung["texts_recall"] for rung in tried) >= 0.9
        if run["reached"]:
            assert min(chosen[f"{kind}_recall"] for kind in index_compare.KINDS) >= results["target"]
            # Nothing cheaper that was tried reached it too.
            cheaper = [
                rung for rung in tried if (rung["nprobes"], rung["refine_factor"]) < (chosen["nprobes"], chosen["refine_factor"])
            ]
            assert not any(
                index_compare.reached(rung, results["target"]) for rung in cheaper if rung["nprobes"] == chosen["nprobes"]
            )
    # 60 partitions of 100 rows: the fewest probes miss the text-like queries, and are not searched further.
    assert stopped_early
    assert json.loads((tmp_path / "c.json").read_text()) == results


def test_reuse_indexes_again_the_table_an_earlier_run_left_and_refuses_one_of_another_size(tmp_path: Path) -> None:
    common = ["--rows", "4000", "--dimensions", "16", "--queries", "20", "--mixtures", "lognormal", "--workdir", str(tmp_path)]
    first = index_compare.main([*common, "--indexes", "rq-100-4"])
    data = tmp_path / "lognormal" / "vectors.lance" / "data"
    made = {path.name: path.stat().st_mtime_ns for path in data.iterdir()}

    again = index_compare.main([*common, "--indexes", "rq-100-4", "--reuse", "--index-cache-mb", "1"])

    # The same rows, not written again, indexed and searched again with the cache asked for.
    assert {path.name: path.stat().st_mtime_ns for path in data.iterdir()} == made
    assert (first["index_cache_mb"], again["index_cache_mb"]) == (256, 1)
    assert again["runs"][0]["chosen"]["texts_recall"] >= 0.9
    with pytest.raises(SystemExit, match="holds 4,000 rows, not --rows 5,000"):
        index_compare.main([*common[2:], "--rows", "5000", "--indexes", "rq-100-4", "--reuse"])
