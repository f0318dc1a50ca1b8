"""Search over the vector store (clip_store, LanceDB) against today's in-memory index, on CLIP-like vectors.

    python -m bench.search_bench --rows 1000000 --dimensions 512 --json bench/out/search.json

The reference, in the same run: `bench.in_memory_index.VectorIndex` (what `clip_worker.index` was), which loads every vector of the
worker's Parquet shards into memory and ranks them exactly, and whose answers are the ground truth
for recall. Measured on both, with ratios:

- **cold**: a fresh process's first query: the reference loads the shard (from local disk) first;
  the store opens its table lazily. Wall time from after the imports, and peak RSS.
- **warm**: p50/p95 of `--queries` top-k queries in this process; recall@k of the store.
- **ingest** (store): worker shards upserted in batches of `--batch-rows`, one commit each, as an
  indexer ingests a batch of finished shards; **index build** time; the exact scan's p95 before
  the build (why the index is needed past `IndexPolicy.exact_below`); p95 with `--fresh-rows`
  rows added after the build (searched exactly next to the index) and the update that folds them in.
- **S3** (store on moto behind a counting proxy, bench/s3_proxy.py): S3 requests, bytes and
  sequential round trips of a fresh process's first query and of each warm one. moto's own latency
  is not S3's, so these counts, not moto's times, are what predict the latency on S3.

`--no-reference` measures the store alone, for more vectors than today's index (or this machine's
memory) holds: the vectors are made, ingested and ranked exactly against the queries a batch at a
time, so recall still has an exact ground truth.

Vectors: a fixed mixture that clusters the way CLIP image embeddings do (`clip_like`), not uniform
noise: every vector shares a common direction (CLIP's narrow cone: random pairs have cosine ~0.26),
belongs to one of 100 themes and 2,000 clusters of Zipf-distributed sizes (same cluster ~0.6), and
varies within its cluster along a decaying spectrum (variance of the i-th of 512 directions ~ 1/i,
randomly rotated). Queries are further samples of the same mixture, not stored.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.in_memory_index import VectorIndex
from clip_worker.writer import shard_schema

if TYPE_CHECKING:  # the store is imported where it is used: the query benchmarks import this module for `shard`
    from clip_store.store import VectorStore

REPOSITORY = Path(__file__).resolve().parents[1]
BUCKET = "bench-bucket"


def shard_table(
    vectors: np.ndarray, model: str = "ViT-B-32", pretrained: str = "openai", bucket: str = "bucket", first: int = 0
) -> pa.Table:
    """Vectors as the rows of one worker shard (clip_worker.writer.shard_schema)."""
    rows, dimensions = vectors.shape
    names = [f"images/{i:08d}.jpg" for i in range(first, first + rows)]
    return pa.table(
        {
            "url": [f"s3://{bucket}/{name}" for name in names],
            "bucket": [bucket] * rows,
            "key": names,
            "version_id": pa.nulls(rows, pa.string()),
            "etag": ["etag"] * rows,
            "last_modified": [None] * rows,
            "model": [model] * rows,
            "pretrained": [pretrained] * rows,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dimensions),
        },
        schema=shard_schema(dimensions),
    )


def shard(
    rows: int, dimensions: int, model: str = "ViT-B-32", pretrained: str = "openai", bucket: str = "bucket", seed: int = 0
) -> bytes:
    """`rows` random unit vectors as one worker shard's Parquet bytes (the query benchmarks' stored vectors)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dimensions), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    buffer = io.BytesIO()
    pq.write_table(shard_table(vectors, model, pretrained, bucket), buffer, compression="zstd")
    return buffer.getvalue()


def clip_like(rows: int, dimensions: int, seed: int) -> np.ndarray:
    """Unit vectors from a fixed CLIP-like mixture (module docstring); `seed` draws the samples."""
    return np.concatenate(list(clip_like_chunks(rows, dimensions, seed)))


def clip_like_chunks(rows: int, dimensions: int, seed: int, chunk: int = 65_536) -> Iterator[np.ndarray]:
    """clip_like's vectors `chunk` at a time, for more than fit in memory."""
    mixture = np.random.default_rng(12345)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731 - a one-line helper read where it is used
    cone = unit(mixture.standard_normal(dimensions)).astype(np.float32)
    themes = unit(mixture.standard_normal((100, dimensions))).astype(np.float32)
    centres = unit(mixture.standard_normal((2_000, dimensions))).astype(np.float32)
    theme_of = mixture.integers(0, len(themes), len(centres))
    sizes = 1.0 / np.arange(1, len(centres) + 1) ** 0.8
    rotation, _ = np.linalg.qr(mixture.standard_normal((dimensions, dimensions)))
    spread = (rotation.T / np.sqrt(np.arange(1, dimensions + 1))[:, None]).astype(np.float32)
    spread /= np.sqrt((spread**2).sum())  # unit expected norm
    # Shares of each vector's squared length: common direction, theme, cluster, spread.
    weights = np.sqrt(np.array([0.25, 0.15, 0.25, 0.35], np.float32))
    samples = np.random.default_rng(seed)
    for start in range(0, rows, chunk):
        count = min(chunk, rows - start)
        cluster = samples.choice(len(centres), count, p=sizes / sizes.sum())
        spread_part = samples.standard_normal((count, dimensions), dtype=np.float32) @ spread
        mixed = (
            weights[0] * cone + weights[1] * themes[theme_of[cluster]] + weights[2] * centres[cluster] + weights[3] * spread_part
        )
        yield unit(mixed).astype(np.float32)


def latencies_ms(queries: np.ndarray, search: Any) -> tuple[list[Any], dict[str, float]]:
    answers, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        answers.append(search(query))
        seconds.append(time.perf_counter() - started)
    ms = np.array(seconds) * 1000
    return answers, {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def cold(mode: str, settings: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [sys.executable, "-m", "bench.search_cold", mode, json.dumps({**settings, "out": out.name})],
            cwd=REPOSITORY,
            env={**os.environ, **(env or {})},
            check=True,
        )
        return json.loads(Path(out.name).read_text())


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def s3_costs(store_dir: Path, queries_file: Path, top: int, warm: int) -> dict[str, Any]:
    """The store copied to moto's S3, searched by a fresh process through the counting proxy."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from bench.s3_proxy import CountingProxy, summarise

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would drown the report
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            **{"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"},
        )
        s3.create_bucket(Bucket=BUCKET)
        files = [path for path in store_dir.rglob("*") if path.is_file()]
        for path in files:
            s3.upload_file(str(path), BUCKET, f"store/{path.relative_to(store_dir)}")
        with CountingProxy(endpoint) as proxy:
            run = cold(
                "store",
                {"uri": f"s3://{BUCKET}/store", "queries": str(queries_file), "top": top, "warm": warm},
                {**env, "AWS_ENDPOINT_URL": proxy.url},
            )
            first = summarise(proxy.between(*run["first_query_window"]))
            per_warm = [summarise(proxy.between(*window)) for window in run["warm_windows"]]
        return {
            "files": len(files),
            "cold_requests": first.requests,
            "cold_mb": round(first.bytes / 1e6, 2),
            "cold_sequential": first.sequential,
            "warm_requests": round(float(np.mean([p.requests for p in per_warm])), 1),
            "warm_kb": round(float(np.mean([p.bytes for p in per_warm])) / 1e3, 1),
            "warm_sequential": round(float(np.mean([p.sequential for p in per_warm])), 1),
            "moto_first_query_s": round(run["first_query_s"], 2),
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200, help="warm queries, each side")
    # An indexer's SQS batch: 10 shards of the dispatcher's 1,000 images. (Small data files also
    # keep moto, which reads a whole object to serve any range of it, usable for the S3 part.)
    parser.add_argument("--batch-rows", type=int, default=10_000, help="rows per ingest commit")
    parser.add_argument("--fresh-rows", type=int, default=10_000, help="rows added after the index is built")
    parser.add_argument("--s3-warm", type=int, default=20, help="warm queries on S3 (0: no S3 measurement)")
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip today's index (it cannot hold 10M vectors): vectors are made, ingested and ranked exactly a batch at a time",
    )
    parser.add_argument(
        "--nprobes",
        type=int,
        nargs="*",
        default=[],
        help="with --no-reference, also measure recall and latency at these nprobes (recall falls as the table grows)",
    )
    parser.add_argument(
        "--refine-factors",
        type=int,
        nargs="*",
        default=[],
        help="with --nprobes, at each of these refine factors too (default: the store's own)",
    )
    parser.add_argument("--workdir", type=Path, help="where the shard and the store go (default: a temporary folder)")
    parser.add_argument(
        "--reuse-store",
        action="store_true",
        help="with --no-reference and --workdir: keep the store an earlier run left there if it has --rows rows, and only "
        "rank exactly again (the mixture is seeded), to sweep settings on a big table without ingesting and building again",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="search-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shard_path, store_dir, queries_file = workdir / "shard.parquet", workdir / "store", workdir / "queries.npy"
    if not args.reuse_store:
        shutil.rmtree(store_dir, ignore_errors=True)
    results: dict[str, Any] = {"rows": args.rows, "dimensions": args.dimensions, "top": args.top, "cpu_count": os.cpu_count()}
    try:
        if args.no_reference:
            streamed(args, store_dir, queries_file, results)
        else:
            compared(args, shard_path, store_dir, queries_file, results)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["bench_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)

    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def compared(args: argparse.Namespace, shard_path: Path, store_dir: Path, queries_file: Path, results: dict[str, Any]) -> None:
    """Today's index and the store side by side, all vectors in memory."""
    from clip_store.maintain import IndexPolicy, maintain
    from clip_store.store import VectorStore

    vectors = clip_like(args.rows, args.dimensions, seed=0)
    queries = clip_like(args.queries + 1, args.dimensions, seed=1)
    np.save(queries_file, queries)
    pq.write_table(shard_table(vectors), shard_path, compression="zstd")
    del vectors  # 2 GB at 1M: the reference process is about to need 9 GB of its own
    results["parquet_mb"] = round(shard_path.stat().st_size / 1e6, 1)

    # Today's path first, while this process holds the least memory.
    progress(f"vectors and shard ready ({results['parquet_mb']} MB); today's index, cold")
    reference_cold = cold("memory", {"shard": str(shard_path), "queries": str(queries_file), "top": args.top})
    progress(f"today's cold first query: {reference_cold}")
    truth, reference_warm = in_memory(shard_path, queries, args.top)
    progress(f"today's warm queries: {reference_warm}; ingesting into the store")

    store = VectorStore(str(store_dir))
    table = pq.read_table(shard_path)
    started = time.perf_counter()
    for first in range(0, args.rows, args.batch_rows):
        store.ingest(table.slice(first, args.batch_rows), shard=f"batch-{first}", still_current=lambda url, etag: True)
    ingest_s = time.perf_counter() - started
    del table

    progress(f"ingested in {ingest_s:.1f} s; exact scans, then the index build")
    _, exact_scan = latencies_ms(queries[:20], lambda q: store.nearest(q, args.top))
    built = maintain(store, IndexPolicy(exact_below=min(args.rows, IndexPolicy().exact_below)))
    progress(f"exact scan {exact_scan}; {built.action} in {built.seconds:.1f} s; warm and cold queries")
    answers, store_warm = latencies_ms(queries, lambda q: [m.url for m in store.nearest(q, args.top)])
    store_cold = cold("store", {"uri": str(store_dir), "queries": str(queries_file), "top": args.top, "warm": 0})
    progress(f"store warm {store_warm}, recall {recall(answers, truth):.4f}; cold {store_cold['first_query_s']:.3f} s")

    results.update(
        reference_cold_s=round(reference_cold["first_query_s"], 2),
        reference_load_s=round(reference_cold["load_s"], 2),
        reference_rss_mb=round(reference_cold["peak_rss_mb"]),
        reference_warm=reference_warm,
        ingest_s=round(ingest_s, 1),
        ingest_vectors_per_s=round(args.rows / ingest_s),
        exact_scan=exact_scan,
        index=built.state.index_type,
        build_s=round(built.seconds, 1),
        store_cold_s=round(store_cold["first_query_s"], 3),
        store_rss_mb=round(store_cold["peak_rss_mb"]),
        store_warm=store_warm,
        recall=round(recall(answers, truth), 4),
        store_mb=round(sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file()) / 1e6, 1),
    )
    if args.s3_warm:
        results["s3"] = s3_costs(store_dir, queries_file, args.top, args.s3_warm)
        progress(f"S3: {results['s3']}")
    if args.fresh_rows:
        fresh_rows(args, store, queries, results)


def in_memory(shard_path: Path, queries: np.ndarray, top: int) -> tuple[list[list[str]], dict[str, float]]:
    """Today's index, warm: its answers (exact: the ground truth) and its latencies. The index is
    freed on return, before the store is measured."""
    index = VectorIndex.from_tables([pq.read_table(shard_path, columns=["url", "vector"])])
    truth, warm = latencies_ms(queries, lambda q: [m.url for m in index.nearest(q, top)])
    expected = np.argsort(-(index.vectors @ (queries[0] / np.linalg.norm(queries[0]))))[:top]
    assert truth[0] == [index.urls[i] for i in expected], "the in-memory index is the exact ground truth"
    return truth, warm


def fresh_rows(args: argparse.Namespace, store: VectorStore, queries: np.ndarray, results: dict[str, Any]) -> None:
    """Rows added after the build: searched exactly next to the index until an update folds them in."""
    from clip_store.maintain import IndexPolicy, maintain

    fresh = clip_like(args.fresh_rows, args.dimensions, seed=2)
    store.ingest(shard_table(fresh, first=args.rows), shard="fresh", still_current=lambda url, etag: True)
    _, with_fresh = latencies_ms(queries, lambda q: store.nearest(q, args.top))
    updated = maintain(store, IndexPolicy(max_unindexed=args.fresh_rows))
    results.update(fresh_rows_warm=with_fresh, update_s=round(updated.seconds, 1))


def streamed(args: argparse.Namespace, store_dir: Path, queries_file: Path, results: dict[str, Any]) -> None:
    """The store alone, for more vectors than memory holds: each batch is made, ingested and
    ranked against the queries exactly, and only every query's best `top` are kept."""
    from clip_store.maintain import IndexPolicy, maintain
    from clip_store.store import SearchSettings, VectorStore

    queries = clip_like(args.queries + 1, args.dimensions, seed=1)
    np.save(queries_file, queries)
    store = VectorStore(str(store_dir))
    reused = args.reuse_store and store.count() == args.rows
    best_scores = np.full((len(queries), args.top), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), args.top), np.int64)
    ingest_s, first = 0.0, 0
    for chunk in clip_like_chunks(args.rows, args.dimensions, seed=0, chunk=args.batch_rows):
        started = time.perf_counter()
        if not reused:
            store.ingest(shard_table(chunk, first=first), shard=f"batch-{first}", still_current=lambda url, etag: True)
        ingest_s += time.perf_counter() - started
        scores = np.concatenate([best_scores, queries @ chunk.T], axis=1)
        rows = np.concatenate(
            [best_rows, np.broadcast_to(np.arange(first, first + len(chunk)), (len(queries), len(chunk)))], axis=1
        )
        keep = np.argsort(-scores, axis=1)[:, : args.top]
        best_scores, best_rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
        first += len(chunk)
        progress(f"{first:,} rows ranked" if reused else f"{first:,} rows ingested ({first / ingest_s:,.0f}/s)")
    truth = [[f"s3://bucket/images/{row:08d}.jpg" for row in rows] for rows in best_rows]
    if reused:
        results["reused_store"] = True
    else:
        built = maintain(store, IndexPolicy(exact_below=min(args.rows, IndexPolicy().exact_below)))
        progress(f"{built.action} in {built.seconds:.1f} s; warm and cold queries")
        results.update(
            ingest_s=round(ingest_s, 1), ingest_vectors_per_s=round(args.rows / ingest_s), build_s=round(built.seconds, 1)
        )
    answers, store_warm = latencies_ms(queries, lambda q: [m.url for m in store.nearest(q, args.top)])
    store_cold = cold("store", {"uri": str(store_dir), "queries": str(queries_file), "top": args.top, "warm": 0})
    results.update(
        index=store.index_state().index_type,
        store_cold_s=round(store_cold["first_query_s"], 3),
        store_rss_mb=round(store_cold["peak_rss_mb"]),
        store_warm=store_warm,
        recall=round(recall(answers, truth), 4),
        store_mb=round(sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file()) / 1e6, 1),
    )
    for nprobes in args.nprobes:
        for refine_factor in args.refine_factors or [SearchSettings().refine_factor]:
            probed = VectorStore(str(store_dir), search=SearchSettings(nprobes=nprobes, refine_factor=refine_factor))
            found, timing = latencies_ms(queries, lambda q, probed=probed: [m.url for m in probed.nearest(q, args.top)])
            setting = f"nprobes {nprobes}, refine {refine_factor}"
            results.setdefault("sweep", {})[setting] = {"recall": round(recall(found, truth), 4), **timing}
            progress(f"{setting}: {results['sweep'][setting]}")
    if args.fresh_rows:
        fresh_rows(args, store, queries, results)


def report(r: dict[str, Any]) -> None:
    """The table: today's index and the store side by side, or the store alone (--no-reference)."""
    reference = {
        "cold first query, s": r.get("reference_cold_s"),
        "query process peak RSS, MB": r.get("reference_rss_mb"),
        "warm p50, ms": r.get("reference_warm", {}).get("p50_ms"),
        "warm p95, ms": r.get("reference_warm", {}).get("p95_ms"),
        "recall@" + str(r["top"]): 1.0 if "reference_warm" in r else None,
    }
    store = [r["store_cold_s"], r["store_rss_mb"], r["store_warm"]["p50_ms"], r["store_warm"]["p95_ms"], r["recall"]]
    print(f"{r['rows']:,} CLIP-like vectors x {r['dimensions']}, top-{r['top']}, {r['cpu_count']} CPUs")
    print(f"{'':28}{'in-memory (today)':>20}{'store (LanceDB)':>20}{'today/store':>14}")
    for (label, today), ours in zip(reference.items(), store, strict=True):
        ratio = f"x{today / ours:.1f}" if today is not None and ours and not label.startswith("recall") else ""
        print(f"{label:28}{'-' if today is None else today:>20}{ours:>20}{ratio:>14}")
    scan = f"; exact scan before the index p95 {r['exact_scan']['p95_ms']} ms" if "exact_scan" in r else ""
    if "build_s" in r:
        print(
            f"store: ingest {r['ingest_vectors_per_s']:,} vectors/s ({r['ingest_s']} s), {r['index']} built in {r['build_s']} s, "
            f"{r['store_mb']} MB on disk{scan}"
        )
    else:
        print(f"store: {r['index']} of an earlier run (--reuse-store), {r['store_mb']} MB on disk")
    for setting, measured in r.get("sweep", {}).items():
        print(f"store at {setting}: recall {measured['recall']}, p50 {measured['p50_ms']} ms, p95 {measured['p95_ms']} ms")
    if "fresh_rows_warm" in r:
        print(f"store: with fresh unindexed rows p95 {r['fresh_rows_warm']['p95_ms']} ms; folding them in took {r['update_s']} s")
    if "s3" in r:
        s3 = r["s3"]
        print(
            f"S3 (moto): cold first query {s3['cold_requests']} requests, {s3['cold_mb']} MB, {s3['cold_sequential']} in sequence; "
            f"warm {s3['warm_requests']} requests, {s3['warm_kb']} KB, {s3['warm_sequential']} in sequence"
        )


if __name__ == "__main__":
    main()
