"""The cost and scale benchmarks still run end to end; their figures are measured by hand, never here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cost_bench, scale_bench
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
    cost_bench.main([*arguments, "--json", str(out)])
    result = json.loads(out.read_text())
    lines = {(line["component"], line["what"]): line for line in result["lines"]}
    assert lines[("dispatcher", "first bytes of each upload")]["per_image"] == 1.0
    assert lines[("worker", "download of each image")]["per_image"] == 1.0
    # One shard and one events batch for the twelve images: nothing is written per image.
    assert lines[("worker", "parquet/ writes")]["requests"] == lines[("worker", "events/ writes")]["requests"] == 1
    assert result["dollars_per_million_without_gpu"] > 1.2
