"""The query API benchmarks still run end to end; their speed is measured by hand, never here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.query_bench import main
from bench.query_limits import main as limits_main
from tests.support import TINY_MODEL


def test_quick_run_measures_cold_start_warm_latency_and_sizes(tiny_config: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "query.json"

    results = main(
        [
            "--quick",
            "--model",
            TINY_MODEL,
            "--model-config",
            str(tiny_config),
            "--pretrained",
            str(tiny_checkpoint),
            "--json",
            str(out),
        ]
    )

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    cold = results["cold_start"]
    phases = (
        "interpreter_s",
        "imports_s",
        "init_s",
        "model_load_s",
        "hash_checkpoint_s",
        "first_embed_text_s",
        "first_embed_image_s",
        "total_s",
    )
    for phase in phases:
        assert cold["best"][phase] > 0, phase
    assert cold["best"]["total_s"] > cold["best"]["init_s"] > cold["best"]["model_load_s"]
    assert set(cold["import_groups_s"]) >= {"torch", "open_clip", "fastapi, pydantic", "clip_query modules"}
    assert cold["torch_import_floor"]["total_s"] > 0 and cold["ratio_total_to_torch_floor"] > 0

    warm = results["warm"]
    assert set(warm["latency_s"]) == {
        "embed_text",
        "embed_image",
        "classify_first",
        "labels_not_baked",
        "classify",
        "search_first",
        "search",
    }
    assert set(warm["ratios"]) == {
        "embed_text",
        "embed_image",
        "classify",
        "search",
        "classify_first_to_classify",
        "search_first_to_search",
    }
    assert all(seconds > 0 for seconds in [*warm["latency_s"].values(), *warm["reference_s"].values()])
    assert all(ratio > 0 for ratio in warm["ratios"].values())
    # The API and open_clip's own code embed the same small photo alike, and rank the same vectors.
    assert warm["checks"]["text_cosine"] > 0.9999 and warm["checks"]["image_cosine"] > 0.999
    assert warm["checks"]["search_results_agree"] and warm["checks"]["search_indexed"] == warm["rows"] == 2000

    sizes = results["sizes"]
    assert sizes["checkpoint_mb"] == tiny_checkpoint.stat().st_size / 1e6 and sizes["baked_label_vectors_mb"] > 0
    assert {"open-clip-torch", "fastapi", "mangum", "pyarrow", "boto3"} <= set(sizes["api_dependencies"])
    assert not any(name.startswith(("torch", "nvidia-")) for name in sizes["api_dependencies"])
    assert sizes["totals_mb"]["api_dependencies"] > 0 and sizes["totals_mb"]["torch_cuda_build"] > 0


def test_quick_run_times_the_costliest_request_of_every_endpoint(
    tiny_config: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "limits.json"

    results = limits_main(
        [
            "--quick",
            "--model",
            TINY_MODEL,
            "--model-config",
            str(tiny_config),
            "--pretrained",
            str(tiny_checkpoint),
            "--json",
            str(out),
        ]
    )

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    # Each request was answered as it must be (200, or 400 for the refusals) or the run would have stopped.
    assert set(results["requests"]) == {
        "embed_one_text", "embed_one_photo", "embed_one_image_png", "embed_one_image_webp", "embed_one_image_tiff",
        "embed_texts", "embed_texts_truncated", "embed_images", "similarity", "classify", "search_text", "search_image",
        "refused_last_text", "refused_nested", "refused_labels",
    }  # fmt: skip
    assert results["limits"]["items"] == 4 and results["limits"]["labels"] == 6
    assert results["costliest_format"] in ("png", "webp", "tiff")
    for measured in results["requests"].values():
        assert measured["seconds"] > 0 and measured["peak_rss_mb"] > 0
        assert (
            measured["projected_cold_s"]
            > measured["projected_s"]
            == pytest.approx(measured["seconds"] * results["scale_to_default_memory"])
        )
