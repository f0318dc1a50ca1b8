"""The cost and scale benchmarks still run end to end; their figures are measured by hand, never here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench import cost_bench, lane_bench, scale_bench
from tests.support import TINY_MODEL


def test_the_dispatcher_simulation_counts_one_get_per_object_and_a_job_per_batch(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert scale_bench.main(["--notifications", "60", "--batch-size", "30", "--shard-size", "1000", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["invocations"] == 2 and result["jobs_per_1000_objects"] == pytest.approx(1000 * 2 / 60, abs=0.01)
    assert result["requests_per_object"]["GetObject"] == 1.0
    assert "HeadObject" not in result["requests_per_object"]


def test_the_cost_run_prices_what_the_pipeline_asks_of_aws(
    tiny_config: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto keeps its recording in the working folder unless told otherwise before it was imported.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cost.json"
    arguments = [
        "--images",
        "12",
        "--model",
        TINY_MODEL,
        "--pretrained",
        str(tiny_checkpoint),
        "--model-config",
        str(tiny_config),
    ]
    figures = tmp_path / "lane.json"
    figures.write_text(json.dumps({"figures": [dataclasses.asdict(dataclasses.replace(FIGURES, model=TINY_MODEL))]}))
    lane = ["--gpu-images-per-second", "400", "--lane", "auto", "--lane-figures", str(figures)]
    cost_bench.main([*arguments, *lane, "--json", str(out)])
    result = json.loads(out.read_text())
    lines = {(line["component"], line["what"]): line for line in result["lines"]}
    assert lines[("dispatcher", "first bytes of each upload")]["per_image"] == 1.0
    assert lines[("worker", "download of each image")]["per_image"] == 1.0
    # One shard and one events batch for the twelve images: nothing is written per image.
    assert lines[("worker", "parquet/ writes")]["requests"] == lines[("worker", "events/ writes")]["requests"] == 1
    assert result["dollars_per_million_without_gpu"] > 1.2
    # What each batch writes is paid once per window: small windows pay it over fewer images.
    split = result["split"]
    assert split["per_batch"] > 0 and split["per_image"] * 1e6 < result["dollars_per_million_without_gpu"]
    assert [row["lane"] for row in result["trickle"]] == ["lambda", "lambda", "batch"]
    ten, hundred, thousand = result["trickle"]
    assert ten["warm"] > hundred["warm"] and ten["cold"] > ten["warm"] and thousand["warm"] == thousand["batch"]


#: A model as the lane sees it: 0.1 CPU-s an image on one thread, 0.11 on two, an INIT of 18 CPU-s
#: of which 8 on its own thread (the rest the sandbox's helpers), 1 CPU-s more on the first call.
FIGURES = lane_bench.Figures(
    model="m", cpu_1_s=0.1, cpu_2_s=0.11, init_cpu_s=18.0, init_serial_cpu_s=8.0, first_call_cpu_s=1.0, peak_rss_mb=2800
)
SPLIT = cost_bench.Split(per_image=1.3e-6, per_batch=1.9e-5)


def test_auto_embeds_small_windows_on_lambda_and_sends_the_rest_to_batch() -> None:
    projection = lane_bench.project(FIGURES, 3008)
    rows = cost_bench.trickle([10, 100, 101, 1000], SPLIT, 400, 0.526, cost_bench.ColdStart(), "auto", projection, max_images=100)

    assert [row.lane for row in rows] == ["lambda", "lambda", "batch", "batch"]
    ten, hundred, over, thousand = rows
    # A cold GPU's minutes dwarf the lane's seconds; an idle function's INIT costs more than a warm one.
    assert ten.batch is not None and ten.warm is not None and ten.cold is not None
    assert ten.warm < ten.cold < ten.batch / 100
    # Over the threshold the lane is Batch's, warm or not.
    assert over.warm == over.cold == over.batch and thousand.cold_latency_s is None
    assert hundred.cold_latency_s is not None and ten.cold_latency_s is not None
    assert hundred.cold_latency_s > ten.cold_latency_s > projection.init_s


def test_a_cold_window_pays_the_init_and_first_call_at_the_functions_memory() -> None:
    projection = lane_bench.project(FIGURES, 3008)
    warm = cost_bench.lane_window(10, False, projection, 0.01)
    cold = cost_bench.lane_window(10, True, projection, 0.01)

    assert cold.seconds - warm.seconds == pytest.approx(projection.init_s + projection.first_call_extra_s, abs=1e-3)
    assert cold.dollars - warm.dollars == pytest.approx(
        (cold.seconds - warm.seconds) * 3008 / 1024 * cost_bench.LAMBDA_GB_SECOND, rel=1e-3
    )
    # Ten images: the work itself is a small part of the window next to the reads, the writes and the request.
    assert warm.seconds == pytest.approx(10 * projection.seconds_per_image + 0.15, abs=1e-3)


def test_a_window_bigger_than_an_invocation_should_hold_is_split_to_end_well_within_15_minutes() -> None:
    projection = lane_bench.project(FIGURES, 3008)
    per_invocation = projection.images_in_5_min
    window = cost_bench.lane_window(3 * per_invocation + 1, True, projection, 0.0)

    assert window.invocations == 4
    # Side by side: the first vector waits for one invocation, not four; each pays its own INIT.
    assert window.latency_s <= 300 + 0.25  # its S3 waits and the dispatcher's on top of the 5 minutes
    one = cost_bench.lane_window(per_invocation, True, projection, 0.0)
    assert window.seconds > 4 * (projection.init_s + projection.first_call_extra_s) and one.invocations == 1
    # Each invocation writes what a job child writes: four batches' manifests, shards and events.
    rows = cost_bench.trickle([3 * per_invocation + 1], SPLIT, 0, 0.526, cost_bench.ColdStart(), "lambda", projection)
    assert rows[0].cold == pytest.approx(
        (SPLIT.window(3 * per_invocation + 1, 4) + window.dollars) / (3 * per_invocation + 1) * 1e6
    )


def test_the_projection_runs_no_faster_than_the_vcpus_allow() -> None:
    small, large = lane_bench.project(FIGURES, 3008), lane_bench.project(FIGURES, 10240)
    # 3,008 MB is 1.7 vCPUs shown as 2 cores: two threads' CPU over 1.7, plus the sandbox's 3 ms.
    assert small.threads == 2 and small.seconds_per_image == pytest.approx(0.11 / (3008 / 1769) + 0.003, abs=1e-4)
    # 10,240 MB: six threads, each beyond the first adding the 0.01 CPU-s the second added here.
    assert large.threads == 6 and large.seconds_per_image == pytest.approx(0.15 / (10240 / 1769) + 0.003, abs=1e-4)
    # Faster with more memory, but dearer: the extra threads' CPU is billed too.
    assert large.seconds_per_image < small.seconds_per_image and large.gb_seconds_per_image > small.gb_seconds_per_image
    # The INIT: all its CPU over 1.7 vCPUs, but no faster than its own thread's 8 s with six.
    assert small.init_s == pytest.approx(18.0 / (3008 / 1769), abs=0.01) and large.init_s == 8.0
    # An invocation is sized to end well within Lambda's 15 minutes.
    assert small.images_in_5_min * small.seconds_per_image + small.init_s + small.first_call_extra_s <= 300
    assert small.fits and not lane_bench.project(FIGURES, 2048).fits


def test_the_lambda_lane_is_priced_only_with_figures_for_the_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="projection"):
        cost_bench.trickle([10], SPLIT, 0, 0.526, cost_bench.ColdStart(), "lambda", None)
    with pytest.raises(SystemExit, match="no recorded lane figures"):
        cost_bench.lane_figures("not-a-model", None)
    figures = tmp_path / "lane.json"
    figures.write_text(json.dumps({"figures": [dataclasses.asdict(FIGURES)]}))
    assert cost_bench.lane_figures("m", figures) == FIGURES
    with pytest.raises(SystemExit, match="no figures for other"):
        cost_bench.lane_figures("other", figures)
