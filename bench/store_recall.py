"""Issue 21's targets, measured as a user of the store meets them: recall, latency, cold start and memory
with the settings the store measured for itself, on mixtures and queries it was not tuned on.

    python -m bench.store_recall --rows 1000000 --mixture lognormal --json bench/out/store-recall-1m-lognormal.json
    python -m bench.store_recall --rows 10000000 --mixture clip_like --bulk --json bench/out/store-recall-10m-clip_like.json

Through clip_store's public API only, as the issue's reproduction did: `VectorStore.ingest` of worker
shards of `--shard-rows` (`search_bench.shard_table`), `maintain(store)` with no text probes (a
library user has none; the indexer passes the label prompts), then `nearest` with the store's
defaults, one query at a time, for the three kinds of query `bench.index_compare` makes (images of
the mixture that are not stored, and two constructions of text-like queries from another cone),
against their exact top-k (one streaming pass over the table, clip_store.recall.exact_answers).

Cold: a fresh process (bench.search_cold) opens the store and makes its first query, timed from
after its imports; it then makes every other query, and its peak RSS (VmHWM) is the figure a query
function needs at this size. `--reuse` searches a store an earlier run left in `--workdir` again,
without ingesting (its `maintain` does what is still due: nothing, if that run finished). `--bulk` appends every shard after the first straight to the
store's table, in the store's own row form (`shard_rows`), without the ingest's per-url lookups of
the versions stored: before the first `maintain` builds the url index, each is a scan of the table,
which makes a 10M load hours here; what ingestion costs is search_bench's to measure. Time it with nothing else running: this is a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.index_compare import MIXTURES, queries_of
from bench.search_bench import shard_table
from bench.search_cold import peak_rss_mb
from clip_store.maintain import maintain
from clip_store.recall import exact_answers
from clip_store.store import VectorStore, shard_rows


def current(url: str, etag: str) -> bool:
    return True  # nothing is deleted here: every row is current


def ingest(store: VectorStore, args: argparse.Namespace) -> float:
    started, first, pending = time.perf_counter(), 0, []
    for chunk in MIXTURES[args.mixture](args.rows, args.dimensions, 1):
        pending.append(chunk)
        if sum(map(len, pending)) >= args.shard_rows or first + sum(map(len, pending)) >= args.rows:
            vectors = np.concatenate(pending)
            rows, name = shard_table(vectors, first=first), f"shard-{first:010d}"
            table = store.table()
            if args.bulk and table is not None:
                table.add(shard_rows(rows, name))
            else:
                store.ingest(rows, shard=name, still_current=current)
            first, pending = first + len(vectors), []
            print(f"  ingested {first:,} rows", end="\r", flush=True)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    uri = str(workdir / "store")
    store = VectorStore(uri)
    results: dict[str, Any] = {"mixture": args.mixture, "dimensions": args.dimensions, "top": args.top}
    if not args.reuse:
        results["ingest_s"] = round(ingest(store, args), 1)
    started = time.perf_counter()
    done = maintain(store)
    # The process's peak so far: with --reuse, what the training and the measurement took.
    results["maintain"] = {
        "action": str(done.action),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak_rss_mb()),
    }
    state = store.index_state()
    results["rows"] = state.rows
    assert state.tuning is not None, "maintain measured nothing: fewer rows than an index needs?"
    results["tuning"] = {
        "nprobes": state.tuning.nprobes,
        "refine_factor": state.tuning.refine_factor,
        "recall": state.tuning.recall,
    }
    print(f"{args.mixture} {args.rows:,}: {state.tuning.summary()}", flush=True)
    table = store.table()
    assert table is not None  # it has a tuning
    queries = queries_of(args.mixture, args.queries, args.dimensions)
    exact = exact_answers(table, queries, {kind: [None] * len(vectors) for kind, vectors in queries.items()}, args.top)
    reader = VectorStore(uri, refresh_s=None)
    for kind, vectors in queries.items():
        times, hits = [], 0
        for query, truth in zip(vectors, exact[kind], strict=True):
            started = time.perf_counter()
            found = reader.nearest(query, args.top)
            times.append((time.perf_counter() - started) * 1000)
            hits += truth.hits([(match.url, match.score) for match in found])
        results[kind] = {
            "recall": round(hits / (args.top * len(vectors)), 4),
            "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p95_ms": round(float(np.percentile(times, 95)), 2),
        }
        print(
            f"  {kind:<9} recall@{args.top} {results[kind]['recall']}  p50 {results[kind]['p50_ms']} ms  p95 {results[kind]['p95_ms']} ms"
        )
    results["cold"] = {
        key: value
        for key, value in cold(uri, np.concatenate(list(queries.values())), args.top, workdir).items()
        if key != "warm_ms"
    }
    print(
        f"  cold: first query {results['cold']['first_query_s']:.2f} s after imports; peak RSS "
        f"{results['cold']['peak_rss_mb']:.0f} MB after {len(queries) * args.queries} queries",
        flush=True,
    )
    return results


def cold(uri: str, queries: np.ndarray, top: int, workdir: Path, **options: Any) -> dict[str, Any]:
    """A fresh process's first query and peak RSS over `queries` (bench.search_cold, with its `options`),
    and each warm query's milliseconds."""
    np.save(workdir / "queries.npy", queries)
    settings = {
        "uri": uri,
        "queries": str(workdir / "queries.npy"),
        "top": top,
        "warm": len(queries),
        "out": str(workdir / "cold.json"),
        **options,
    }
    subprocess.run([sys.executable, "-m", "bench.search_cold", "store", json.dumps(settings)], check=True)
    found = json.loads((workdir / "cold.json").read_text())
    return {
        "first_query_s": round(found["first_query_s"], 3),
        "peak_rss_mb": round(found["peak_rss_mb"], 1),
        "warm_ms": [(end - start) * 1000 for start, end in found["warm_windows"]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mixture", choices=sorted(MIXTURES), default="lognormal")
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--shard-rows", type=int, default=100_000, help="rows a worker shard (one ingest)")
    parser.add_argument("--workdir", type=Path, help="where the store goes (default: a temporary folder, removed after)")
    parser.add_argument("--reuse", action="store_true", help="search the store in --workdir again, without ingesting")
    parser.add_argument("--bulk", action="store_true", help="append shards after the first without the ingest's lookups")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.reuse and not args.workdir:
        parser.error("--reuse needs --workdir")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = measure(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            results = measure(args, Path(workdir))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    # maintain's progress (the training, each search setting measured): minutes at 10M rows.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("clip_store").setLevel(logging.INFO)
    main()
