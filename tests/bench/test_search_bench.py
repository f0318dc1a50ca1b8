from __future__ import annotations

import importlib.util
from pathlib import Path


def test_search_bench_runs_and_agrees_with_a_full_sort() -> None:
    spec = importlib.util.spec_from_file_location("search_bench", Path(__file__).parents[2] / "bench" / "search_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--rows", "20000", "--dimensions", "64", "--repeats", "1"])
    assert results["rows"] == 20000 and results["query_ms"] > 0 and results["speedup_vs_full_sort"] > 0
