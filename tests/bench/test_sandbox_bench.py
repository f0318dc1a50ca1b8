"""The sandbox benchmark still runs; its figures are measured by hand, never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

from bench.sandbox_bench import main
from tests.support import TINY_MODEL


def test_a_run_reports_the_helpers_and_the_query_process(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "sandbox.json"

    assert main(["--helpers", "2", "--model", TINY_MODEL, "--model-config", str(tiny_config), "--json", str(out)]) == 0

    results = json.loads(out.read_text())
    helpers, query = results["helpers"], results["query"]
    assert len(helpers["each"]) == 2 and all(one["rss"] > 0 for one in helpers["each"])
    assert query["model"] == TINY_MODEL and query["ready_s"] >= query["model_loaded_s"] > 0
    assert query["helpers"]["rss"] > 0 and query["all"]["pss"] > query["parent"]["pss"]
