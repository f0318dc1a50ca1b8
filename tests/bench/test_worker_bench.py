"""The benchmark script still runs end to end; its speed is measured by hand, never here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.worker_bench import main
from tests.support import TINY_MODEL


@pytest.mark.filterwarnings("ignore:CLIP_PRETRAINED=none")
def test_quick_run_reports_both_ratios_and_embeddings_that_match_open_clip(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"

    assert main(["--quick", "--model", TINY_MODEL, "--model-config", str(tiny_config), "--json", str(out)]) == 0

    results = json.loads(out.read_text())
    (decode,) = results["decode"]
    assert decode["worker_images_per_s"] > 0 and decode["reference_images_per_s"] > 0
    assert decode["speedup"] > 0
    assert decode["min_cosine"] >= 0.999
    end_to_end = results["end_to_end"]
    assert end_to_end["images"] == 4
    assert end_to_end["worker_images_per_s"] > 0 and end_to_end["naive_images_per_s"] > 0
    assert end_to_end["speedup"] > 0
    assert end_to_end["min_cosine"] >= 0.999
    assert end_to_end["unsandboxed_images_per_s"] > 0 and end_to_end["sandbox_cost"] > 0
    (sandbox,) = results["sandbox"]
    assert sandbox["in_process_images_per_s"] > 0 and sandbox["sandboxed_images_per_s"] > 0 and sandbox["cost"] > 0
