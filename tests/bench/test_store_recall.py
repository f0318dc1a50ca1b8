from __future__ import annotations

import json
from pathlib import Path

from bench import store_recall


def test_the_store_is_measured_with_its_own_settings_on_every_kind_of_query(tmp_path: Path) -> None:
    arguments = ["--rows", "12000", "--dimensions", "16", "--queries", "20", "--shard-rows", "5000", "--workdir", str(tmp_path)]
    results = store_recall.main([*arguments, "--bulk", "--json", str(tmp_path / "r.json")])

    # The first shard through the ingest, the rest appended (--bulk): past exact_below, an index and its recall.
    assert results["maintain"]["action"] == "build" and results["rows"] == 12_000
    assert set(results["tuning"]["recall"]) == {"images", "shifted", "blurred"}
    for kind in ("images", "texts", "concepts"):
        assert 0.5 <= results[kind]["recall"] <= 1 and 0 < results[kind]["p50_ms"] <= results[kind]["p95_ms"]
    assert results["cold"]["first_query_s"] > 0 and results["cold"]["peak_rss_mb"] > 50
    assert json.loads((tmp_path / "r.json").read_text()) == results
    # Searching the same store again reads what the first run left, with the same settings and answers.
    again = store_recall.main([*arguments, "--reuse"])
    assert (
        again["maintain"]["action"] == "none"
        and again["tuning"] == results["tuning"]
        and again["texts"]["recall"] == results["texts"]["recall"]
    )
