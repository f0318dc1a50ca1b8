"""What the decoding sandbox's helper processes (clip_worker/sandbox.py) cost to hold and to start.

(1) helpers: a Sandbox of --helpers processes started as the worker and the query API start theirs;
    seconds until every one has answered a first call, and each one's memory (RSS, and what is its
    own: private pages, PSS).
(2) the query API's process: in a fresh interpreter, after its imports, how long QueryService takes
    to be ready (its helpers start while it loads ViT-B-32, random weights) and to answer its first
    image (a 2 MP JPEG), and the memory of that process and its helper together.

The per-image and end-to-end cost of the sandbox is bench/worker_bench.py's (b) and (c).

    python -m bench.sandbox_bench                  # the run recorded in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

REPOSITORY = Path(__file__).resolve().parents[1]


def memory_mb(pid: int) -> dict[str, float]:
    """RSS, PSS and private (clean + dirty) memory of one process, from the kernel's own accounting."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return {
        "rss": fields["Rss"] / 1024,
        "pss": fields["Pss"] / 1024,
        "private": (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024,
    }


def total(processes: Sequence[dict[str, float]]) -> dict[str, float]:
    return {name: round(sum(process[name] for process in processes), 1) for name in ("rss", "pss", "private")}


def bench_helpers(helpers: int) -> dict[str, Any]:
    from clip_worker.config import WorkerConfig
    from clip_worker.sandbox import Sandbox

    config = WorkerConfig(manifest_uri="", output_bucket="")
    started = time.perf_counter()
    with Sandbox(config.decode_limits, helpers) as sandbox:
        for _ in range(helpers):  # each helper in turn: every one has started
            sandbox.run("start", len, b"")
        ready_s = time.perf_counter() - started
        each = [memory_mb(pid) for pid in sandbox.pids]
    return {"helpers": helpers, "ready_s": round(ready_s, 2), "each": [total([one]) for one in each], "all": total(each)}


def query_child(model: str, model_config: str | None) -> dict[str, Any]:
    """Run in a fresh interpreter: the query service's start, first image and memory."""
    import warnings

    from bench._harness import jpeg_photo
    from clip_query.config import QueryConfig
    from clip_query.service import QueryService

    imported = time.perf_counter()
    settings = {"OUTPUT_BUCKET": "bench-output", "CLIP_MODEL": model, "CLIP_PRETRAINED": "none"}
    config = QueryConfig.from_env({**settings, "CLIP_MODEL_CONFIG": model_config or ""})
    # The vector store (never searched here) would connect to S3; what is measured is the model and the helpers.
    with warnings.catch_warnings(), mock.patch("clip_query.service.VectorStore"):
        warnings.simplefilter("ignore")  # random weights: the loud warning is for deployments
        service = QueryService(config, s3=None)
    loaded = time.perf_counter()
    service.sandbox.run("start", len, b"")  # its helpers, started beside the model's loading, are ready
    ready = time.perf_counter()
    service.vectors({}, {"photo": jpeg_photo((1600, 1200))}, truncate=False)
    answered = time.perf_counter()
    parent = memory_mb(os.getpid())
    helpers = [memory_mb(pid) for pid in service.sandbox.pids]
    service.sandbox.close()
    return {
        "model": model,
        "model_loaded_s": round(loaded - imported, 2),
        "ready_s": round(ready - imported, 2),
        "first_image_s": round(answered - ready, 3),
        "parent": total([parent]),
        "helpers": total(helpers),
        "all": total([parent, *helpers]),
    }


def bench_query(model: str, model_config: str | None) -> dict[str, Any]:
    extra = ["--model-config", model_config] if model_config else []
    done = subprocess.run(
        [sys.executable, "-m", "bench.sandbox_bench", "--query-child", "--model", model, *extra],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.splitlines()[-1]))


def report(helpers: dict[str, Any], query: dict[str, Any]) -> str:
    each = ", ".join(f"{one['rss']:.0f}" for one in helpers["each"])
    return "\n".join(
        [
            f"(1) {helpers['helpers']} helpers as the worker and the query API start them",
            f"    ready in {helpers['ready_s']} s; RSS each {each} MB; all: RSS {helpers['all']['rss']:.0f} MB, "
            f"private {helpers['all']['private']:.0f} MB, PSS {helpers['all']['pss']:.0f} MB",
            f"(2) the query API's process (QueryService, {query['model']}, 1 helper), after its imports",
            f"    model loaded {query['model_loaded_s']} s, ready {query['ready_s']} s, "
            f"first 2 MP JPEG {query['first_image_s'] * 1000:.0f} ms",
            f"    process RSS {query['parent']['rss']:.0f} MB + helper RSS {query['helpers']['rss']:.0f} MB; "
            f"together PSS {query['all']['pss']:.0f} MB, private {query['all']['private']:.0f} MB",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--helpers", type=int, default=2, help="helpers in (1) (default 2, a job's on 2 vCPUs)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32, random weights)")
    parser.add_argument("--model-config", help="an extra open_clip model config, as CLIP_MODEL_CONFIG")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--query-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.query_child:
        print(json.dumps(query_child(args.model, args.model_config)))
        return 0
    results = {"helpers": bench_helpers(args.helpers), "query": bench_query(args.model, args.model_config)}
    print(report(results["helpers"], results["query"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
