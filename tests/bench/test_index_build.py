from __future__ import annotations

import json
from pathlib import Path

from bench import index_build


def test_index_build_trains_at_each_size_in_a_pinned_process_and_projects_to_the_lambda(tmp_path: Path) -> None:
    results = index_build.main(
        ["--rows", "30000", "12000", "--dimensions", "32", "--batch-rows", "5000", "--json", str(tmp_path / "b.json")]
    )

    builds = results["builds"]
    assert [(build["rows"], build["action"]) for build in builds] == [(12_000, "build"), (30_000, "retrain")]
    assert builds[1]["rows_ratio"] == 2.5 and builds[0]["time_ratio"] == 1.0
    assert all(build["peak_rss_mb"] > 0 for build in builds)
    assert builds[1]["lambda_1024mb_s_estimate"] == round(builds[1]["seconds"] * 1769 / 1024)
    assert json.loads((tmp_path / "b.json").read_text()) == results
