"""How big a table the indexer function can train its index on in time: the IndexMaxTrainRows default.

    python -m bench.index_build --rows 500000 1000000 2500000 --cores 1 --json bench/out/index-build.json

One store of CLIP-like 512-d vectors (search_bench's mixture, upserted in 100,000-row commits as the
indexer does) grows through the sizes given. At each size a fresh process pinned to `--cores` CPUs
(LanceDB sizes its thread pools by the CPUs it may use) runs what `maintain` runs when a training
is due: the first size builds the index (and the url B-tree), later ones retrain it; then, after
10,000 more rows (IndexPolicy.max_unindexed), the update the indexer runs after most ingests
(compaction, and the new rows added to the trained partitions). It reports each one's wall time
and that process's peak RSS. The reference, in the same run, is the first size: each
later build's time is given as a ratio to it, next to the ratio of the rows.

A Lambda function gets memory / 1,769 MB of a vCPU (1.7 at the indexer's 3,008 MB), so a build
measured on one whole core is projected to take `seconds / 1.7` there, as if it used them all: an
estimate, labelled so. The peak RSS is what has to fit the function's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.cost_bench import LAMBDA_MB_PER_VCPU, function_memory_mb
from bench.search_bench import REPOSITORY, clip_like_chunks, progress, shard_table
from bench.search_cold import peak_rss_mb

#: The indexer function's memory: its CPU share, and what a build's peak RSS must fit.
INDEXER_MEMORY_MB = function_memory_mb("IndexerFunction")


def train(store_dir: str, cores: int, update: bool) -> dict[str, Any]:
    """In the child: what maintain does when a training (or only an update) is due, on `cores` CPUs."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from clip_store.maintain import IndexPolicy, maintain
    from clip_store.store import VectorStore

    # Due at any size: a build on a table without an index, a retrain on one that has grown at all;
    # or, with `update`, never a retrain, so the default policy's update.
    policy = IndexPolicy(retrain_growth=float("inf")) if update else IndexPolicy(exact_below=1, retrain_growth=1.0)
    done = maintain(VectorStore(store_dir), policy)
    return {
        "action": str(done.action),
        "rows": done.state.rows,
        "seconds": round(done.seconds, 3),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[500_000, 1_000_000, 2_500_000])
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--cores", type=int, default=1, help="CPUs the training process may use")
    parser.add_argument("--batch-rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None, help="where the store goes (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-update", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(train(args.child, args.cores, args.child_update)))
        return {}

    from clip_store.maintain import IndexPolicy
    from clip_store.store import VectorStore

    sizes = sorted(args.rows)
    rows_added = IndexPolicy().max_unindexed
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        store_dir = str(Path(workdir) / "store")
        store = VectorStore(store_dir)
        chunks = clip_like_chunks(sizes[-1] + rows_added * len(sizes), args.dimensions, seed=0, chunk=args.batch_rows)
        pending = np.empty((0, args.dimensions), np.float32)

        def ingest_to(rows: int) -> None:
            nonlocal pending
            while (ingested := store.count()) < rows:
                pending = pending if len(pending) else next(chunks)
                chunk, pending = pending[: rows - ingested], pending[rows - ingested :]
                store.ingest(shard_table(chunk, first=ingested), shard=f"batch-{ingested}", still_current=lambda url, etag: True)

        def measured(update: bool) -> dict[str, Any]:
            child = subprocess.run(
                [sys.executable, "-m", "bench.index_build", "--child", store_dir, "--cores", str(args.cores)]
                + (["--child-update"] if update else []),
                cwd=REPOSITORY,
                check=True,
                capture_output=True,
                text=True,
            )
            done = json.loads(child.stdout.strip().splitlines()[-1])
            done["lambda_s_estimate"] = round(done["seconds"] * args.cores * LAMBDA_MB_PER_VCPU / INDEXER_MEMORY_MB)
            progress(json.dumps(done))
            return done

        builds, updates = [], []
        for size in sizes:
            ingest_to(max(size, store.count()))
            progress(f"{store.count():,} rows; training on {args.cores} core(s)")
            builds.append(measured(update=False))
            ingest_to(store.count() + rows_added)
            updates.append(measured(update=True))
    reference = builds[0]
    for build in builds:
        build["rows_ratio"] = round(build["rows"] / reference["rows"], 2)
        build["time_ratio"] = round(build["seconds"] / reference["seconds"], 2)
    results = {
        "dimensions": args.dimensions,
        "cores": args.cores,
        "lambda_memory_mb": INDEXER_MEMORY_MB,
        "builds": builds,
        "updates": updates,
        "measured_at": time.strftime("%Y-%m-%d"),
    }
    print(f"index training on {args.cores} core(s), {args.dimensions}-d; reference: {reference['rows']:,} rows")
    print(
        f"{'rows':>12} {'action':>8} {'seconds':>8} {'x rows':>7} {'x time':>7} {'peak MB':>8} "
        f"{f'{INDEXER_MEMORY_MB} MB Lambda, s (est.)':>25}"
    )
    for build in [*builds, *updates]:
        print(
            f"{build['rows']:>12,} {build['action']:>8} {build['seconds']:>8} {build.get('rows_ratio', ''):>7} "
            f"{build.get('time_ratio', ''):>7} {build['peak_rss_mb']:>8} {build['lambda_s_estimate']:>25}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
