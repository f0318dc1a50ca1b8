"""What churn costs a store on S3: requests of a fresh reader's query and of a small ingest, after many
small indexer batches, against a store holding the same rows written at once.

Each batch is what the indexer does for a trickle of uploads and deletes: one commit of a couple of
rows, a removal (tombstone, then the row's delete), and the upkeep (`maintain`). The stores live on
moto's S3 behind a counting proxy (bench/s3_proxy.py), since LanceDB's own S3 client is invisible to
boto3; a "fresh reader" is a new store object, with no cache, as a cold query container has.

Three stores, built in the same process:

- **fresh**: the churned store's surviving rows, ingested in one commit;
- **churned**: the batches with the indexer's upkeep (compaction by fragment count, IndexPolicy);
- **churned, no compaction**: the same batches with compaction by fragment count turned off, as
  upkeep was before (only an index update past 10,000 unindexed rows compacted).

    .venv/bin/python -m bench.store_churn                 # 60 batches, as issue 19 measured
    .venv/bin/python -m bench.store_churn --batches 300   # growth with more
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from clip_store import IndexPolicy

DIMENSIONS = 512


def rows(names: list[str], seed: int) -> pa.Table:
    from clip_worker.writer import shard_schema

    vectors = np.random.default_rng(seed).standard_normal((len(names), DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pa.table(
        {
            "url": [f"s3://input/{name}" for name in names],
            "bucket": ["input"] * len(names),
            "key": names,
            "version_id": pa.nulls(len(names), pa.string()),
            "etag": ["e"] * len(names),
            "last_modified": [None] * len(names),
            "model": ["m"] * len(names),
            "pretrained": ["none"] * len(names),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIMENSIONS),
        },
        schema=shard_schema(DIMENSIONS),
    )


def trusting(url: str, etag: str) -> bool:
    return True


def churn(uri: str, tombstones_uri: str, batches: int, max_fragments: int) -> list[str]:
    """The batches, as the indexer runs them (upkeep included); returns the urls that survive."""
    from clip_store import Database, IndexPolicy, Tombstones, VectorStore, maintain

    policy = replace(IndexPolicy(), max_fragments=max_fragments)
    store = VectorStore(uri, tombstones=Tombstones(Database(tombstones_uri)))
    for n in range(batches):
        store.ingest(rows([f"{n}a.jpg", f"{n}b.jpg"], seed=n), shard=f"s{n}", still_current=trusting)
        if n:
            store.delete([f"s3://input/{n - 1}a.jpg"])
        maintain(store, policy)
    table = store.table()
    assert table is not None
    return sorted(table.to_arrow().column("url").to_pylist())


def costs(proxy: Any, uri: str, tombstones_uri: str) -> dict[str, Any]:
    """Requests of a fresh reader's first query, and of a one-row ingest by a fresh writer (a cold
    indexer container) and again by the same one (a warm container); upkeep is counted in the churn."""
    from bench.s3_proxy import summarise
    from clip_store import Database, Tombstones, VectorStore

    query = np.ones(DIMENSIONS, np.float32)
    started = time.monotonic()
    reader = VectorStore(uri, refresh_s=None)
    reader.nearest(query, 10)
    read = summarise(proxy.between(started, time.monotonic()))
    started = time.monotonic()
    writer = VectorStore(uri, tombstones=Tombstones(Database(tombstones_uri)))
    writer.ingest(rows(["one-more.jpg"], seed=10**6), shard="one", still_current=trusting)
    ingest = summarise(proxy.between(started, time.monotonic()))
    started = time.monotonic()
    writer.ingest(rows(["and-another.jpg"], seed=10**6 + 1), shard="two", still_current=trusting)
    warm = summarise(proxy.between(started, time.monotonic()))
    return {
        "query_requests": read.requests,
        "query_gets": read.gets,
        "ingest_requests": ingest.requests,
        "warm_ingest_requests": warm.requests,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument(
        "--max-fragments", type=int, nargs="+", default=[IndexPolicy().max_fragments], help="IndexPolicy.max_fragments to compare"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    from bench.s3_proxy import CountingProxy

    saved = dict(os.environ)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    results: dict[str, Any] = {"batches": args.batches}
    try:
        with CountingProxy(f"http://{host}:{port}") as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            boto3.client("s3").create_bucket(Bucket="out")
            labels = {f"churned, compacted at {limit} fragments": (f"churned-{limit}", limit) for limit in args.max_fragments}
            labels["churned, no compaction"] = ("uncompacted", 10**9)
            per_batch = {}
            for label, (uri, limit) in labels.items():
                started = time.monotonic()
                survivors = churn(f"s3://out/{uri}", f"s3://out/tombstones-{uri}", args.batches, limit)
                per_batch[label] = len(proxy.between(started, time.monotonic())) / args.batches
            from clip_store import VectorStore

            names = [url.removeprefix("s3://input/") for url in survivors]
            VectorStore("s3://out/fresh").ingest(rows(names, seed=1), shard="all", still_current=trusting)
            for label, (uri, _) in {"fresh": ("fresh", 0), **labels}.items():
                results[label] = costs(proxy, f"s3://out/{uri}", f"s3://out/tombstones-{uri}")
                results[label]["requests_per_batch"] = round(per_batch.get(label, 0.0), 1)
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
    fresh = results["fresh"]
    print(f"{args.batches} batches of 2 rows in, 1 removed (rows left: {len(survivors)}); S3 requests:")
    print(f"{'store':<36}{'per batch':>10}{'fresh query':>12}{'cold 1-row ingest':>19}{'warm 1-row ingest':>19}")
    for label in ("fresh", *labels):
        found = results[label]
        print(
            f"{label:<36}{found['requests_per_batch']:>10}{found['query_requests']:>12}{found['ingest_requests']:>19}"
            f"{found['warm_ingest_requests']:>19}"
            f"   ({found['query_requests'] / fresh['query_requests']:.1f}x / {found['ingest_requests'] / fresh['ingest_requests']:.1f}x"
            f" / {found['warm_ingest_requests'] / fresh['warm_ingest_requests']:.1f}x fresh)"
        )
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)
    return results


if __name__ == "__main__":
    main()
