from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench import index_compare


def test_text_like_queries_sit_in_another_cone_than_the_images() -> None:
    for chunks in index_compare.MIXTURES.values():
        stored = next(chunks(2_000, 64, 1))
        images, texts = next(chunks(200, 64, 2)), index_compare.text_like(next(chunks(200, 64, 3)), seed=4)
        common = stored.mean(axis=0) / np.linalg.norm(stored.mean(axis=0))
        # The modality gap: far less of the images' common direction, yet still near the images they describe.
        assert (texts @ common).mean() < 0.6 * (images @ common).mean()
        assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)


def test_each_index_climbs_its_ladder_on_both_mixtures_and_both_kinds_of_query(tmp_path: Path) -> None:
    results = index_compare.main(
        ["--rows", "3000", "--dimensions", "16", "--queries", "20", "--indexes", "rq-500", "--json", str(tmp_path / "c.json")]
    )

    assert [(run["mixture"], run["index"]) for run in results["runs"]] == [("clip_like", "rq-500"), ("lognormal", "rq-500")]
    for run in results["runs"]:
        rungs = run["rungs"]
        assert rungs and all(0 <= rung[f"{kind}_recall"] <= 1 for rung in rungs for kind in ("images", "texts"))
        assert [rung["nprobes"] for rung in rungs] == sorted(rung["nprobes"] for rung in rungs)  # cheapest first
        # Probing every partition and re-ranking 100 x k candidates finds what the exact scan finds at 16-d.
        assert rungs[-1]["texts_recall"] >= 0.9
        chosen = run["texts_at_target"]
        assert chosen is None or chosen["texts_recall"] >= results["target"]
    assert json.loads((tmp_path / "c.json").read_text()) == results
