"""The Lambda lane's benchmark still runs end to end, cold start included; its speed is measured by hand, never here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cost_bench, lane_bench
from tests.support import TINY_MODEL


@pytest.mark.filterwarnings("ignore:CLIP_PRETRAINED=none")
def test_quick_run_times_every_step_and_a_cold_start_and_projects_them(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "lane.json"

    assert lane_bench.main(["--quick", "--models", TINY_MODEL, "--model-config", str(tiny_config), "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    steps = {(row["step"], row["threads"]): row for row in result["per_image"]}
    assert set(steps) == {("prepare 640x480", 1), ("prepare 640x480", 2), ("forward", 1), ("forward", 2)}
    assert all(row["cpu_s"] > 0 and row["wall_s"] > 0 and row["images"] == 4 for row in steps.values())
    (cold,) = result["cold"]
    # The fresh process loaded the checkpoint it was given through the worker's loader and embedded a batch.
    assert cold["imports"]["torch"] > 0 and cold["load_s"] > 0 and cold["hashing_s"] > 0
    assert cold["first_batch_images"] == lane_bench.FIRST_BATCH and cold["first_batch_s"] > 0
    assert cold["helpers_cpu_s"] > 0 and cold["total_cpu_s"] > cold["helpers_cpu_s"]
    assert cold["helpers"] >= 1 and cold["helper_peak_rss_mb"] > 0
    assert 0 < cold["init_s"] < cold["interpreter_s"] + cold["imports_s"] + cold["load_s"]
    assert [row["memory_mb"] for row in result["projections"]] == list(lane_bench.LAMBDA_MEMORIES_MB)
    # What the cost model reads back: the INIT's CPU, the helpers' included, the hashing not.
    figures = cost_bench.lane_figures(TINY_MODEL, out)
    assert figures.init_cpu_s == pytest.approx(cold["total_cpu_s"] - cold["first_batch_cpu_s"] - cold["hashing_s"])
    assert 0 < figures.init_serial_cpu_s < figures.init_cpu_s and figures.cpu_1_s > 0
    assert figures.peak_rss_mb > cold["peak_rss_mb"]
