"""How fast `clip-pipeline search` ranks a million stored vectors on one machine.

Builds N random unit vectors of the model's width as the worker's Parquet shard, then times
(a) reading the shard into the index and (b) one top-k query, against a reference that sorts
every score (what a naive implementation does), as a ratio measured in the same process.

    python bench/search_bench.py --rows 1000000 --dimensions 512
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_worker.index import VectorIndex
from clip_worker.writer import shard_schema


def shard(
    rows: int, dimensions: int, model: str = "ViT-B-32", pretrained: str = "openai", bucket: str = "bucket", seed: int = 0
) -> bytes:
    """`rows` random unit vectors as one worker shard (clip_worker.writer.shard_schema)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dimensions), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = [f"images/{i:08d}.jpg" for i in range(rows)]
    table = pa.table(
        {
            "url": [f"s3://{bucket}/{name}" for name in names],
            "bucket": [bucket] * rows,
            "key": names,
            "version_id": pa.nulls(rows, pa.string()),
            "etag": ["etag"] * rows,
            "model": [model] * rows,
            "pretrained": [pretrained] * rows,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dimensions),
        },
        schema=shard_schema(dimensions),
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def best_of(repeats: int, work: object) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()  # type: ignore[operator]
        timings.append(time.perf_counter() - started)
    return min(timings)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    data = shard(args.rows, args.dimensions)
    started = time.perf_counter()
    index = VectorIndex.from_tables([pq.read_table(io.BytesIO(data))])
    load_s = time.perf_counter() - started
    query = np.random.default_rng(1).standard_normal(args.dimensions).astype(np.float32)

    ours_s = best_of(args.repeats, lambda: index.nearest(query, args.top))
    reference_s = best_of(args.repeats, lambda: np.argsort(-(index.vectors @ (query / np.linalg.norm(query))))[: args.top])
    expected = np.argsort(-(index.vectors @ (query / np.linalg.norm(query))))[: args.top]
    assert [m.url for m in index.nearest(query, args.top)] == [index.urls[i] for i in expected]

    results = {
        "rows": args.rows,
        "dimensions": args.dimensions,
        "parquet_mb": round(len(data) / 2**20, 1),
        "load_s": round(load_s, 3),
        "query_ms": round(ours_s * 1000, 2),
        "full_sort_query_ms": round(reference_s * 1000, 2),
        "speedup_vs_full_sort": round(reference_s / ours_s, 2),
    }
    print(
        f"{args.rows:,} vectors x {args.dimensions}: shard {results['parquet_mb']} MB, loaded in {results['load_s']} s; "
        f"top-{args.top} query {results['query_ms']} ms (full sort {results['full_sort_query_ms']} ms, "
        f"x{results['speedup_vs_full_sort']})"
    )
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)
    return results


if __name__ == "__main__":
    main()
