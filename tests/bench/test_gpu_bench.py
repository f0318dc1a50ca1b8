"""The GPU benchmark still runs end to end on the CPU; its GPU figures are measured on a GPU box, never here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.gpu_bench import main
from tests.support import TINY_MODEL


def test_quick_cpu_run_reports_all_three_pipelines_and_agreeing_vectors(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    cpus = os.sched_getaffinity(0)
    # --decode device: the worker's GPU data path (device_decode.py), here on CPU tensors.
    argv = ["--quick", "--device", "cpu", "--decode", "device", "--cpus", "1", "--models", TINY_MODEL]

    assert main([*argv, "--model-config", str(tiny_config), "--json", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["environment"]["cpus"] == 1
    assert results["environment"]["hardware_jpeg_decoder"] is False  # what GPU_DECODE=auto goes by; no GPU here
    assert os.sched_getaffinity(0) == cpus  # the limit ends with the run
    (row,) = results["rows"]
    assert (row["model"], row["megapixels"], row["images"]) == (TINY_MODEL, 0.3, 16)
    for rate in ("reference_images_per_s", "worker_images_per_s", "ceiling_images_per_s"):
        assert row[rate] > 0
    assert row["worker_vs_reference"] == round(row["worker_images_per_s"] / row["reference_images_per_s"], 2)
    assert row["min_cosine"] >= 0.999  # the reference and the worker embedded the same photos alike
    assert results["peak_gpu_memory_bytes"] == {TINY_MODEL: None}
    printed = capsys.readouterr().out
    assert "1 CPUs used" in printed and "(2)/(1)" in printed and "(2)/(3)" in printed
