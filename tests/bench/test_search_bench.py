from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import search_bench


def test_search_bench_measures_the_store_against_the_in_memory_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = search_bench.main(
        [
            "--rows",
            "6000",
            "--dimensions",
            "128",
            "--queries",
            "20",
            "--batch-rows",
            "2000",
            "--fresh-rows",
            "500",
            "--s3-warm",
            "2",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )

    assert results["index"] == "IVF_RQ" and results["recall"] >= 0.9
    assert results["ingest_vectors_per_s"] > 0 and results["store_cold_s"] > 0 and results["reference_cold_s"] > 0
    # The fresh process's first query on S3 went through the proxy, and so did each warm one.
    assert results["s3"]["cold_requests"] >= results["s3"]["cold_sequential"] >= 1
    assert results["s3"]["warm_requests"] >= 1
    assert (tmp_path / "r.json").is_file()
    assert "today/store" in capsys.readouterr().out


def test_clip_like_vectors_cluster_as_clip_embeddings_do() -> None:
    vectors = search_bench.clip_like(4000, 128, seed=0)
    cosines = vectors[:2000] @ vectors[2000:].T
    nearest = cosines.max(axis=1)

    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert 0.15 < float(cosines.mean()) < 0.35  # CLIP's narrow cone: unrelated images are not orthogonal
    assert float(np.median(nearest)) > 0.6  # but every image has close neighbours


def test_search_bench_without_the_reference_ranks_batch_by_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = [
        "--rows",
        "5000",
        "--dimensions",
        "128",
        "--queries",
        "10",
        "--batch-rows",
        "1000",
        "--fresh-rows",
        "0",
        "--s3-warm",
        "0",
        "--no-reference",
        "--nprobes",
        "4",
        "--refine-factors",
        "5",
        "40",
        "--workdir",
        str(tmp_path),
    ]
    results = search_bench.main(arguments)

    assert results["index"] == "IVF_RQ" and results["recall"] >= 0.9 and "reference_warm" not in results
    assert set(results["sweep"]) == {"nprobes 4, refine 5", "nprobes 4, refine 40"}
    assert results["sweep"]["nprobes 4, refine 40"]["recall"] >= results["sweep"]["nprobes 4, refine 5"]["recall"]
    assert "store (LanceDB)" in capsys.readouterr().out
    # Sweeping again over the same table: nothing ingested or built, the same exact ground truth.
    again = search_bench.main([*arguments, "--reuse-store"])
    assert again["reused_store"] and "build_s" not in again and again["sweep"].keys() == results["sweep"].keys()
    assert again["recall"] == results["recall"]
