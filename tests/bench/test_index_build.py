from __future__ import annotations

import json
from pathlib import Path

from bench import index_build


def test_index_build_trains_at_each_size_in_a_pinned_process_and_projects_to_the_lambda(tmp_path: Path) -> None:
    results = index_build.main(
        ["--rows", "30000", "12000", "--dimensions", "32", "--batch-rows", "5000", "--json", str(tmp_path / "b.json")]
    )

    builds, updates = results["builds"], results["updates"]
    assert [(build["rows"], build["action"]) for build in builds] == [(12_000, "build"), (30_000, "retrain")]
    # After each training, 10,000 more rows (IndexPolicy.max_unindexed) and the update that folds them in.
    assert [(update["rows"], update["action"]) for update in updates] == [(22_000, "update"), (40_000, "update")]
    assert builds[1]["rows_ratio"] == 2.5 and builds[0]["time_ratio"] == 1.0
    assert all(done["peak_rss_mb"] > 0 for done in [*builds, *updates])
    assert builds[1]["lambda_s_estimate"] == round(builds[1]["seconds"] * 1769 / 3008)
    assert json.loads((tmp_path / "b.json").read_text()) == results
