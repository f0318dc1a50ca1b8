"""Which index type and partition size reach recall@10 >= 0.98 for text queries at the lowest p95 (issue 21, item 2).

    python -m bench.index_compare --rows 1000000 --mixtures clip_like lognormal \
        --indexes rq-4096-1 rq-4096-4 rq-8192-4 rq-2048-4 pq-64-4096 --json bench/out/index-compare-1m.json

For each mixture of `--rows` stored vectors (two of our own: `search_bench.clip_like`, and
`lognormal` below), with three kinds of query that are not stored:

- `images`: further samples of the same mixture;
- `texts`: out of the images' distribution, as CLIP's text embeddings are (the "modality gap"):
  a further sample with most of the images' common direction taken out, one other direction put
  in, strongly (3x the content), and isotropic noise added (`text_like`);
- `concepts`: another construction of the same gap (`concept_like`): the mean of four samples of
  the mixture (a text describes many images, blurrily), its common direction swapped for another.

Neither is the store's own `shifted` probe (clip_store.recall.shifted), so the bench does not
grade the store on the queries it tunes itself with. It computes each query's exact top-k with one
streaming pass (clip_store.recall.exact_answers, the measurement `maintain` makes), then, for each
index type, builds the index on the same table (build seconds, index size on disk) and looks for the
cheapest settings as `maintain` does (clip_store.recall: the fewest partitions reaching `--target`
for every kind at the most thorough refine, then the smallest refine there; each setting searched
hardest kind first and stopped at the first kind that misses), then times every kind at the
settings found one query at a time in this process (p50/p95); an IVF_HNSW_SQ index's ladder is
timed at every rung. The summary row of a (mixture, index) is the settings found,
with each kind's recall and latency: the default is the type with the lowest p95 there, within the
query function's memory (search_bench.py measures a query process's peak RSS on the chosen type).

Index types (LanceDB 0.40, all `dot` distance on unit vectors):
  rq-N-B[-sR]     IVF_RQ (B-bit RaBitQ codes) with partitions of ~N rows (the store's: rq-4096-4),
                  its k-means trained on R rows a partition (LanceDB's sample_rate, 256 unless given)
  pq-S-N          IVF_PQ with S sub-vectors of 8 bits, partitions of ~N rows
  hnsw-sq-P       IVF_HNSW_SQ with P partitions (an HNSW graph of 8-bit codes in each)

Latencies are local (a LanceDB folder on this machine's disk, warm cache); S3 adds the per-request
costs search_bench.py counts. Time them with nothing else running: this is a 2-core machine.
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
from clip_store import database, recall
from clip_store.recall import Answer, exact_answers, score

CHUNK = 65_536
#: (nprobes, ef) for HNSW, cheapest first: ef is the graph search's beam, refine is not used.
HNSW_LADDER = ((4, 100), (8, 100), (8, 200), (16, 200), (32, 300), (64, 400))
#: Hardest first: a setting is searched with the next kind only if the one before reached the target.
KINDS = ("texts", "concepts", "images")


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
    return unit(unit(lifted) + 3.0 * other + noise)


def concept_like(images: np.ndarray, seed: int) -> np.ndarray:
    """Means of four of `images` each, their common direction swapped for another: see the module docstring."""
    rng = np.random.default_rng(seed)
    common = unit(images.mean(axis=0, keepdims=True)[0])
    other = unit(rng.standard_normal((images.shape[1],)))
    other = unit(other - float(other @ common) * common)
    blurred = images[rng.integers(0, len(images), (len(images), 4))].mean(axis=1)
    lifted = blurred - np.outer(blurred @ common, common)
    noise = rng.standard_normal(images.shape).astype(np.float32) / np.sqrt(images.shape[1])
    return unit(unit(lifted) + 1.5 * other + 0.5 * noise)


def queries_of(mixture: str, count: int, dimensions: int) -> dict[str, np.ndarray]:
    """The three kinds of query (module docstring), from samples of the mixture that are not stored."""
    return {
        "images": next(MIXTURES[mixture](count, dimensions, 2)),
        "texts": text_like(next(MIXTURES[mixture](count, dimensions, 3)), seed=4),
        "concepts": concept_like(next(MIXTURES[mixture](count, dimensions, 5)), seed=6),
    }


def stored_table(directory: Path, mixture: str, args: argparse.Namespace) -> Any:
    """The mixture's `--rows` vectors: made again, unless `--reuse` finds them made by an earlier run."""
    # The query function's bound on LanceDB's index cache, unless told otherwise: past it, a search reads
    # the partitions it probes again, which is what a big store's queries cost there.
    session = database.session(args.index_cache_mb * 2**20)
    if args.reuse and (directory / "vectors.lance").exists():
        kept = lancedb.connect(str(directory), session=session).open_table("vectors")
        if kept.count_rows() != args.rows:
            raise SystemExit(f"{directory} holds {kept.count_rows():,} rows, not --rows {args.rows:,}")
        return kept
    shutil.rmtree(directory, ignore_errors=True)
    rows, dimensions = args.rows, args.dimensions
    connection = lancedb.connect(str(directory), session=session)
    table = None
    first = 0
    for chunk in MIXTURES[mixture](rows, dimensions, 1):
        batch = pa.table(
            {
                "url": [f"s3://bench/{i:09d}.jpg" for i in range(first, first + len(chunk))],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), dimensions),
            }
        )
        table = connection.create_table("vectors", batch) if table is None else table
        if first:
            table.add(batch)
        first += len(chunk)
    return table


def index_config(spec: str, rows: int) -> tuple[Any, int]:
    """LanceDB's index configuration for `spec` (module docstring), and the partitions it makes."""
    if spec.startswith("rq-"):
        size, bits, *rest = spec.split("-")[1:]
        sample_rate = int(rest[0].lstrip("s")) if rest else 256
        rq = IvfRq(distance_type="dot", target_partition_size=int(size), num_bits=int(bits), sample_rate=sample_rate)
        return rq, max(1, rows // int(size))
    if spec.startswith("pq-"):
        _, sub_vectors, pq_size = spec.split("-")
        pq = IvfPq(distance_type="dot", num_sub_vectors=int(sub_vectors), target_partition_size=int(pq_size))
        return pq, max(1, rows // int(pq_size))
    if spec.startswith("hnsw-sq-"):
        partitions = int(spec.split("-")[2])
        return IvfHnswSq(distance_type="dot", num_partitions=partitions), partitions
    raise SystemExit(f"unknown index {spec!r} (rq-N-B[-sR], pq-S-N, hnsw-sq-P)")


def one_at_a_time(
    table: Any, hnsw: bool, rung: tuple[int, int], queries: dict[str, np.ndarray], exact: dict[str, list[Answer]], k: int
) -> dict[str, Any]:
    """Each kind's recall at `rung`, and its p50/p95 with each query searched and timed alone, as a reader searches."""
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
            distances = found.column("_distance").to_pylist()
            hits += truth.hits(
                [(url, score(distance)) for url, distance in zip(found.column("url").to_pylist(), distances, strict=True)]
            )
        result[f"{kind}_recall"] = round(hits / (k * len(vectors)), 4)
        result[f"{kind}_p50_ms"] = round(float(np.percentile(times, 50)), 2)
        result[f"{kind}_p95_ms"] = round(float(np.percentile(times, 95)), 2)
    return result


def hardest_first(
    table: Any, rung: tuple[int, int], queries: dict[str, np.ndarray], exact: dict[str, list[Answer]], args: argparse.Namespace
) -> dict[str, Any]:
    """Each kind's recall at an IVF (nprobes, refine) `rung`, searched as the store measures it (batched, hardest kind
    first) and stopped at the first kind that misses the target: at 10M a setting below the one reached costs one
    kind's searches, not three."""
    result: dict[str, Any] = {"nprobes": rung[0], "refine_factor": rung[1]}
    for kind in KINDS:
        unowned: list[str | None] = [None] * len(queries[kind])
        result[f"{kind}_recall"] = recall.recall_at(table, queries[kind], unowned, exact[kind], *rung, args.top)
        if result[f"{kind}_recall"] < args.target:
            break
    return result


def reached(found: dict[str, Any], target: float) -> bool:
    return all(found.get(f"{kind}_recall", -1.0) >= target for kind in KINDS)


def cheapest(
    table: Any,
    spec: str,
    partitions: int,
    queries: dict[str, np.ndarray],
    exact: dict[str, list[Answer]],
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The settings tried, in order, and the cheapest at which every kind reaches the target (else the most
    thorough), timed one query at a time: for IVF_RQ and IVF_PQ the search clip_store.recall.measure makes
    (recall.cheapest, hardest kind first), for IVF_HNSW_SQ its ladder, timed at every rung."""
    hnsw = spec.startswith("hnsw")
    tried: list[dict[str, Any]] = []
    if hnsw:
        for setting in (*(setting for setting in HNSW_LADDER if setting[0] < partitions), (partitions, 400)):
            tried.append(one_at_a_time(table, True, setting, queries, exact, args.top))
            if reached(tried[-1], args.target):
                break
        return tried, tried[-1]

    def rung(nprobes: int, refine_factor: int) -> dict[str, Any]:
        tried.append(hardest_first(table, (nprobes, refine_factor), queries, exact, args))
        return tried[-1]

    found = recall.cheapest(rung, lambda result: reached(result, args.target), partitions)
    return tried, one_at_a_time(table, False, (found["nprobes"], found["refine_factor"]), queries, exact, args.top)


def compare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "rows": args.rows,
        "dimensions": args.dimensions,
        "target": args.target,
        "index_cache_mb": args.index_cache_mb,
        "runs": [],
    }
    for mixture in args.mixtures:
        directory = workdir / mixture
        started = time.perf_counter()
        table = stored_table(directory, mixture, args)
        queries = queries_of(mixture, args.queries, args.dimensions)
        exact = exact_answers(table, queries, {kind: [None] * len(vectors) for kind, vectors in queries.items()}, args.top)
        print(f"{mixture}: {args.rows:,} rows stored and exact answers in {time.perf_counter() - started:.1f} s", flush=True)
        for spec in args.indexes:
            config, partitions = index_config(spec, args.rows)
            started = time.perf_counter()
            table.create_index("vector", config=config, replace=True)
            build_s = time.perf_counter() - started
            # The index just made: a replaced one's files stay beside it until a cleanup.
            newest = max((directory / "vectors.lance" / "_indices").iterdir(), key=lambda folder: folder.stat().st_mtime)
            index_mb = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / 1e6
            tried, chosen = cheapest(table, spec, partitions, queries, exact, args)
            run = {
                "mixture": mixture,
                "index": spec,
                "build_s": round(build_s, 1),
                "index_mb": round(index_mb, 1),
                "tried": tried,
                "chosen": chosen,
                "reached": reached(chosen, args.target),
            }
            results["runs"].append(run)
            print(summary_line(run), flush=True)
            if args.json:  # after each run: a long comparison stopped midway keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def summary_line(run: dict[str, Any]) -> str:
    chosen = run["chosen"]
    head = f"  {run['mixture']:<10} {run['index']:<14} build {run['build_s']:>7.1f} s  index {run['index_mb']:>7.1f} MB  "
    setting = ", ".join(f"{key} {chosen[key]}" for key in ("nprobes", "refine_factor", "ef") if key in chosen)
    kinds = "  ".join(
        f"{kind} {chosen[f'{kind}_recall']} p95 {chosen[f'{kind}_p95_ms']} ms" for kind in KINDS if f"{kind}_recall" in chosen
    )
    return head + f"{setting}: {kinds}" + ("" if run["reached"] else "  (target NOT reached)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--mixtures", nargs="+", choices=sorted(MIXTURES), default=sorted(MIXTURES))
    parser.add_argument("--indexes", nargs="+", default=["rq-4096-1", "rq-4096-4", "rq-8192-4", "pq-64-4096"])
    parser.add_argument("--workdir", type=Path, help="where the tables go (default: a temporary folder, removed after)")
    parser.add_argument("--reuse", action="store_true", help="index again the tables an earlier run left in --workdir")
    parser.add_argument(
        "--index-cache-mb",
        type=int,
        default=database.INDEX_CACHE_BYTES // 2**20,
        help="LanceDB's index cache (default: the query function's); an index bigger than it is read again by each search",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.reuse and not args.workdir:
        parser.error("--reuse needs --workdir")
    if args.workdir:
        results = compare(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            results = compare(args, Path(workdir))
    return results


if __name__ == "__main__":
    main()
