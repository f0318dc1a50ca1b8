from __future__ import annotations

import json
from pathlib import Path

from bench import index_compare, search_cache


def test_each_cache_bound_gets_a_fresh_process_timed_for_every_kind_of_query(tmp_path: Path) -> None:
    index_compare.main(
        ["--rows", "6000", "--dimensions", "16", "--queries", "20", "--mixtures", "lognormal", "--indexes", "rq-100-4"]
        + ["--workdir", str(tmp_path)]
    )
    common = ["--workdir", str(tmp_path), "--mixture", "lognormal", "--rows", "6000", "--dimensions", "16", "--queries", "20"]

    results = search_cache.main(
        [*common, "--nprobes", "20", "--refine-factor", "5", "--cache-mb", "1", "64", "--json", str(tmp_path / "c.json")]
    )

    assert [run["cache_mb"] for run in results["runs"]] == [1, 64]
    for run in results["runs"]:
        assert 0 < run["first_query_s"] < 60 and run["peak_rss_mb"] > 50
        assert all(0 < run[kind]["p50_ms"] <= run[kind]["p95_ms"] for kind in ("images", "texts", "concepts"))
    assert json.loads((tmp_path / "c.json").read_text()) == results
