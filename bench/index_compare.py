"""Which index type and partition size reach recall@10 >= 0.98 for text queries at the lowest p95 (issue 21, item 2).

    python -m bench.index_compare --rows 1000000 --mixtures clip_like lognormal \
        --indexes rq-4096 rq-2048 pq-128-4096 hnsw-sq-32 --json bench/out/index-compare-1m.json

For each mixture of `--rows` stored vectors (two of our own: `search_bench.clip_like`, and
`lognormal` below), with two kinds of query that are not stored:

- `images`: further samples of the same mixture;
- `texts`: out of the images' distribution, as CLIP's text embeddings are (the "modality gap"):
  a further sample with most of the images' common direction taken out, another common direction
  put in, and isotropic noise added (a text describes many images, blurrily);

it computes each query's exact top-k with one streaming pass (clip_store.recall.exact_answers, the
measurement `maintain` makes), then, for each index type, builds the index on the same table (build
seconds, index size on disk) and climbs that type's ladder of search settings, timing each query one
at a time in this process (p50/p95), until both kinds reach `--target` (or the ladder ends). The
summary row of a (mixture, index) is its cheapest rung at which texts reach the target, with that
rung's image recall and latency: the default is the type with the lowest p95 there, within the
query function's memory (search_bench.py measures a query process's peak RSS on the chosen type).

Index types (LanceDB 0.40, all `dot` distance on unit vectors):
  rq-N            IVF_RQ (1-bit RaBitQ codes) with partitions of ~N rows: the store's today (N=4096)
  pq-S-N          IVF_PQ with S sub-vectors of 8 bits, partitions of ~N rows
  hnsw-sq-P       IVF_HNSW_SQ with P partitions (an HNSW graph of 8-bit codes in each)

Latencies are local (a LanceDB folder on this machine's disk, warm cache); S3 adds the per-request
costs search_bench.py counts. This shared 2-core machine times nothing reliably past ~100k rows
with other work running: the 1M/10M runs belong on a quiet machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import IvfHnswSq, IvfPq, IvfRq

from bench.search_bench import clip_like_chunks
from clip_store.recall import LADDER, exact_answers, rungs

CHUNK = 65_536
#: (nprobes, ef) for HNSW: ef is the graph search's beam, refine is not used.
HNSW_LADDER = ((4, 100), (8, 100), (8, 200), (16, 200), (32, 300), (64, 400))


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def lognormal_chunks(rows: int, dimensions: int, seed: int) -> Iterator[np.ndarray]:
    """Another CLIP-like mixture than clip_like: a stronger common direction, 5,000 clusters of
    lognormal sizes under 60 super-clusters, noise along a steeper spectrum (1/i^1.5) in its own
    rotation, and 1% near-duplicates (another row of the same chunk, nudged)."""
    mixture = np.random.default_rng(777)
    cone = unit(mixture.standard_normal(dimensions))
    supers = unit(mixture.standard_normal((60, dimensions)))
    super_of = mixture.integers(0, len(supers), 5_000)
    centres = unit(supers[super_of] + 0.8 * unit(mixture.standard_normal((5_000, dimensions))))
    sizes = mixture.lognormal(0.0, 1.5, len(centres))
    rotation, _ = np.linalg.qr(mixture.standard_normal((dimensions, dimensions)))
    spread = (rotation.T / np.arange(1, dimensions + 1)[:, None] ** 0.75).astype(np.float32)
    spread /= np.sqrt((spread**2).sum())
    weights = np.sqrt(np.array([0.35, 0.3, 0.35], np.float32))
    samples = np.random.default_rng(seed)
    for start in range(0, rows, CHUNK):
        count = min(CHUNK, rows - start)
        cluster = samples.choice(len(centres), count, p=sizes / sizes.sum())
        noise = samples.standard_normal((count, dimensions), dtype=np.float32) @ spread
        mixed = unit(weights[0] * cone + weights[1] * centres[cluster] + weights[2] * noise)
        twins = samples.random(count) < 0.01
        if twins.any() and count > 1:
            originals = samples.integers(0, count, int(twins.sum()))
            mixed[twins] = unit(
                mixed[originals] + 0.02 * samples.standard_normal((int(twins.sum()), dimensions)) / np.sqrt(dimensions)
            )
        yield mixed


MIXTURES = {"clip_like": clip_like_chunks, "lognormal": lognormal_chunks}


def text_like(images: np.ndarray, seed: int) -> np.ndarray:
    """Queries from another cone than `images` (a sample of the mixture, not stored): see the module docstring."""
    rng = np.random.default_rng(seed)
    common = unit(images.mean(axis=0, keepdims=True)[0])
    other = unit(rng.standard_normal((images.shape[1],)))
    other = unit(other - float(other @ common) * common)
    lifted = images - 0.8 * np.outer(images @ common, common)
    noise = rng.standard_normal(images.shape).astype(np.float32) / np.sqrt(images.shape[1])
    return unit(unit(lifted) + 0.6 * other + 0.5 * noise)


def stored_table(directory: Path, mixture: str, rows: int, dimensions: int) -> Any:
    database = lancedb.connect(str(directory))
    table = None
    first = 0
    for chunk in MIXTURES[mixture](rows, dimensions, 1):
        batch = pa.table(
            {
                "url": [f"s3://bench/{i:09d}.jpg" for i in range(first, first + len(chunk))],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), dimensions),
            }
        )
        table = database.create_table("vectors", batch) if table is None else table
        if first:
            table.add(batch)
        first += len(chunk)
    return table


def index_config(spec: str, rows: int) -> tuple[Any, tuple[tuple[int, int], ...]]:
    if spec.startswith("rq-"):
        size = int(spec.split("-")[1])
        partitions = max(1, rows // size)
        return IvfRq(distance_type="dot", target_partition_size=size), tuple(rungs(LADDER, partitions))
    if spec.startswith("pq-"):
        _, sub_vectors, pq_size = spec.split("-")
        partitions = max(1, rows // int(pq_size))
        config = IvfPq(distance_type="dot", num_sub_vectors=int(sub_vectors), target_partition_size=int(pq_size))
        return config, tuple(rungs(LADDER, partitions))
    if spec.startswith("hnsw-sq-"):
        partitions = int(spec.split("-")[2])
        ladder = tuple(rung for rung in HNSW_LADDER if rung[0] < partitions) + ((partitions, 400),)
        return IvfHnswSq(distance_type="dot", num_partitions=partitions), ladder
    raise SystemExit(f"unknown index {spec!r} (rq-N, pq-S-N, hnsw-sq-P)")


def measured_rung(
    table: Any, hnsw: bool, rung: tuple[int, int], queries: dict[str, np.ndarray], exact: dict[str, list[set[str]]], k: int
) -> dict[str, Any]:
    first, second = rung
    result: dict[str, Any] = {"nprobes": first, ("ef" if hnsw else "refine_factor"): second}
    for kind, vectors in queries.items():
        times, hits = [], 0
        for query, truth in zip(vectors, exact[kind], strict=True):
            search = table.search(query, vector_column_name="vector").distance_type("dot").nprobes(first)
            search = search.ef(second) if hnsw else search.refine_factor(second)
            started = time.perf_counter()
            found = search.limit(k).select(["url", "_distance"]).to_arrow()
            times.append((time.perf_counter() - started) * 1000)
            hits += len(truth & set(found.column("url").to_pylist()))
        result[f"{kind}_recall"] = round(hits / (k * len(vectors)), 4)
        result[f"{kind}_p50_ms"] = round(float(np.percentile(times, 50)), 2)
        result[f"{kind}_p95_ms"] = round(float(np.percentile(times, 95)), 2)
    return result


def compare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"rows": args.rows, "dimensions": args.dimensions, "target": args.target, "runs": []}
    for mixture in args.mixtures:
        directory = workdir / mixture
        shutil.rmtree(directory, ignore_errors=True)
        started = time.perf_counter()
        table = stored_table(directory, mixture, args.rows, args.dimensions)
        images = next(MIXTURES[mixture](args.queries, args.dimensions, 2))  # the same mixture, other samples
        queries = {"images": images, "texts": text_like(next(MIXTURES[mixture](args.queries, args.dimensions, 3)), seed=4)}
        exact = exact_answers(table, queries, {kind: [None] * len(vectors) for kind, vectors in queries.items()}, args.top)
        print(f"{mixture}: {args.rows:,} rows stored and exact answers in {time.perf_counter() - started:.1f} s", flush=True)
        for spec in args.indexes:
            config, ladder = index_config(spec, args.rows)
            started = time.perf_counter()
            table.create_index("vector", config=config, replace=True)
            build_s = time.perf_counter() - started
            index_mb = sum(f.stat().st_size for f in (directory / "vectors.lance" / "_indices").rglob("*") if f.is_file()) / 1e6
            climbed = []
            for rung in ladder:
                climbed.append(measured_rung(table, spec.startswith("hnsw"), rung, queries, exact, args.top))
                if min(climbed[-1]["images_recall"], climbed[-1]["texts_recall"]) >= args.target:
                    break
            chosen = next((rung for rung in climbed if rung["texts_recall"] >= args.target), None)
            run = {
                "mixture": mixture,
                "index": spec,
                "build_s": round(build_s, 1),
                "index_mb": round(index_mb, 1),
                "rungs": climbed,
                "texts_at_target": chosen,
            }
            results["runs"].append(run)
            print(summary_line(run), flush=True)
    return results


def summary_line(run: dict[str, Any]) -> str:
    chosen = run["texts_at_target"]
    head = f"  {run['mixture']:<10} {run['index']:<14} build {run['build_s']:>7.1f} s  index {run['index_mb']:>7.1f} MB  "
    if chosen is None:
        best = max(run["rungs"], key=lambda rung: rung["texts_recall"])
        return head + f"texts never reach the target (best {best['texts_recall']}, images {best['images_recall']})"
    setting = {key: value for key, value in chosen.items() if key in ("nprobes", "refine_factor", "ef")}
    return head + (
        f"{setting}: texts {chosen['texts_recall']} p50 {chosen['texts_p50_ms']} / p95 {chosen['texts_p95_ms']} ms, "
        f"images {chosen['images_recall']} p95 {chosen['images_p95_ms']} ms"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--mixtures", nargs="+", choices=sorted(MIXTURES), default=sorted(MIXTURES))
    parser.add_argument("--indexes", nargs="+", default=["rq-4096", "rq-2048", "pq-128-4096", "hnsw-sq-32"])
    parser.add_argument("--workdir", type=Path, help="where the tables go (default: a temporary folder, removed after)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.workdir:
        results = compare(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            results = compare(args, Path(workdir))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
