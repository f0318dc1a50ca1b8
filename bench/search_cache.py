"""What the query function's index cache bound (SEARCH_INDEX_CACHE_MB) does to a big store's queries:
a fresh process per bound, as a query function's container, over a table bench.index_compare left.

    python -m bench.search_cache --workdir /work/data/cmp/10m --mixture clip_like --rows 10000000 \\
        --nprobes 640 --refine-factor 5 --cache-mb 256 4096 --json bench/out/search-cache-10m.json

For each bound: the process opens the table as a VectorStore (bench.search_cold), reads the whole index
into the cache first where the bound can hold it (`VectorStore.prewarm`; the query function does not,
it fills its cache as its searches read partitions, so this measures a container once it is warm),
makes its first query, then every other query of bench.index_compare's three kinds (images, texts,
concepts: 200 each) one at a time; it reports the first query's seconds (after imports, prewarm
included), each kind's warm p50/p95 and its peak RSS. The settings are given (the table has no
measured ones): those bench.index_compare found for it. Time it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.index_compare import MIXTURES, queries_of
from bench.store_recall import cold


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="bench.index_compare's --workdir")
    parser.add_argument("--mixture", choices=sorted(MIXTURES), default="clip_like")
    parser.add_argument("--rows", type=int, required=True, help="the table's rows (for the index's size)")
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--nprobes", type=int, required=True)
    parser.add_argument("--refine-factor", type=int, required=True)
    parser.add_argument("--cache-mb", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    queries = queries_of(args.mixture, args.queries, args.dimensions)
    # Codes of 4 bits a dimension, the store's index: what a bound must hold to keep it all.
    index_mb = args.rows * args.dimensions / 2 / 2**20
    results: dict[str, Any] = {"rows": args.rows, "nprobes": args.nprobes, "refine_factor": args.refine_factor, "runs": []}
    for bound in args.cache_mb:
        found = cold(
            str(args.workdir / args.mixture),
            np.concatenate(list(queries.values())),
            args.top,
            args.workdir,
            index_cache_mb=bound,
            prewarm=bound > index_mb,
            nprobes=args.nprobes,
            refine_factor=args.refine_factor,
        )
        # The first query is the cold one; the warm ones follow in queries_of's order of kinds.
        warm = np.array([np.nan, *found["warm_ms"]]).reshape(len(queries), args.queries)
        run = {"cache_mb": bound, "first_query_s": found["first_query_s"], "peak_rss_mb": found["peak_rss_mb"]}
        for kind, times in zip(queries, warm, strict=True):
            run[kind] = {
                "p50_ms": round(float(np.nanpercentile(times, 50)), 1),
                "p95_ms": round(float(np.nanpercentile(times, 95)), 1),
            }
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
