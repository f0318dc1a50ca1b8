"""What the query API's Lambda costs: its cold start, its warm latency against open_clip's own code,
and the size of what its image holds, measured on this machine.

(1) cold start, in fresh interpreters, as Lambda's init phase and first invocations: (a) starting
    Python and importing everything the entry point imports, (b) `import clip_query.lambda_function`
    (configuration, S3 client, the model loaded from a checkpoint file, the FastAPI app), (c) its
    first invocations with events/query-embed-text.json and events/query-embed-image.json, on moto.
    Against a fresh interpreter that only imports torch: the floor any torch Lambda pays.
(2) warm latency, in this process, through `lambda_function.handler` (Mangum, no network): /embed
    of a text and of a 2 MP JPEG (base64 JSON), /classify with the default label set (first call,
    with its text vectors baked into CLIP_CACHE_DIR as the image's build does, and later), GET /search
    over N stored vectors in a Parquet shard on moto S3 (first call, which loads it, and later).
    Against open_clip's own code on the same model: PIL.Image.open + preprocess + encode_image on a
    batch of one, tokenizer + encode_text; the ratios are what the API adds (base64, type sniffing,
    JSON, ASGI, logging, metrics).
(3) sizes: the fp32 checkpoint, the installed size of the API's Python dependencies (from each
    distribution's file list), and torch here, which is PyPI's CUDA build, not the CPU build the
    Lambda image installs.

Each figure is the best of several tries (cold starts: --repeats fresh processes; warm calls:
--warm-repeats, the API and its reference taking turns), so compare ratios more than absolute times.

    python -m bench.query_bench --json bench/out/query.json   # the run recorded in docs/benchmarks.md
    python -m bench.query_bench --quick                       # a smoke run
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from bench._harness import JPEG_QUALITY, REPOSITORY, environment, jpeg_photo, save_random_checkpoint, write_json
from bench.query_function import (
    EVENTS,
    FUNCTION_NAME,
    MEMORY_MB,
    OUTPUT_BUCKET,
    STORED_BUCKET,
    clean_environment,
    entry_point,
    event,
    function_environment,
    invoke,
    moto_server,
)
from bench.query_sizes import MB, bench_sizes, image_mb
from bench.search_bench import shard
from bench.worker_bench import positive
from clip_shared import keys
from clip_store import ingest_shards
from clip_worker import bake
from clip_worker.labels import DEFAULT_LABELS, LabelSet

SEARCH_TEXT = "a photo of a cat"
SEARCH_K = 10
FULL_IMAGE = (1600, 1200)
QUICK_IMAGE = (320, 240)
#: Turns each side of a warm comparison takes (see `fastest`).
ROUNDS = 4

#: What the first line of clip_query.lambda_function's imports bring in, in groups, so (a) can say
#: which library costs what. Together they are every module the entry point imports before its own
#: work; the last group is the API's own modules (and whatever of theirs the others did not load).
IMPORT_GROUPS = (
    ("torch", "import torch"),
    ("torchvision", "import torchvision"),
    ("open_clip", "import open_clip"),
    ("numpy, pyarrow", "import numpy, pyarrow, pyarrow.parquet"),
    ("Pillow", "import PIL.Image"),
    ("boto3", "import boto3; from botocore.config import Config"),
    (
        "powertools",
        "from aws_lambda_powertools import Logger, Metrics, Tracer; from aws_lambda_powertools.metrics import MetricUnit; "
        "from aws_lambda_powertools.utilities.typing import LambdaContext",
    ),
    ("fastapi, pydantic", "import fastapi, fastapi.responses, pydantic, starlette.concurrency"),
    ("mangum", "from mangum import Mangum"),
    (
        "clip_query modules",
        "import clip_query.config, clip_query.errors, clip_query.models, clip_query.inputs, clip_query.service, clip_query.middleware, clip_query.api",
    ),
)

# ---------------------------------------------------------------------------------------------
# helpers


def best(values: Sequence[float]) -> float:
    return min(values)


def fastest(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds of each side's fastest of `repeats` calls. The sides take turns in up to ROUNDS
    rounds, each side making its share of the calls in a row, and who goes first swaps each round.

    Runs of calls rather than single calls in turn: the API runs the model on a new AnyIO worker
    thread (and OpenMP thread pool) each invocation, the reference on this thread; on the shared
    2-core machine these figures come from, strict alternation left calls far noisier (medians up to
    10x the fastest) than runs did.
    """
    found = {name: math.inf for name in sides}
    turns = list(sides.items())
    runs = [len(part) for part in np.array_split(range(repeats), min(ROUNDS, repeats))]
    for round_, calls in enumerate(runs):
        for name, work in turns if round_ % 2 == 0 else turns[::-1]:
            for _ in range(calls):
                started = time.perf_counter()
                work()
                found[name] = min(found[name], time.perf_counter() - started)
    return found


# ---------------------------------------------------------------------------------------------
# (1) cold start


def child(kind: str, env: dict[str, str], settings: dict[str, Any], folder: Path) -> tuple[float, dict[str, Any]]:
    """`python -m bench.cold_child kind`: when it was spawned (wall clock), and what it measured."""
    out = folder / f"{kind}.json"
    out.unlink(missing_ok=True)
    spawned = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "bench.cold_child", kind, json.dumps({**settings, "out": str(out)})],
        # The child runs in a scratch folder; it finds this repository's benchmarks through the path.
        env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))},
        cwd=folder,
        stdout=subprocess.DEVNULL,  # the JSON log lines and EMF metrics the function prints
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the {kind} cold-start process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return spawned, json.loads(out.read_text())


def cold_start_once(env: dict[str, str], settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    spawned, measured = child("function", env, settings, folder)
    interpreter = measured["started"] - spawned
    imports = measured["imported"] - measured["started"]
    first = measured["first"]
    return {
        "interpreter_s": interpreter,
        "imports_s": imports,
        "import_groups_s": measured["imports"],
        "startup_s": interpreter + imports,
        "init_s": measured["init_s"],
        "model_load_s": measured["model_load_s"],
        "hash_checkpoint_s": measured["weights_id_s"],
        "first_embed_text_s": first["embed_text"],
        "first_embed_image_s": first["embed_image"],
        "total_s": interpreter + imports + measured["init_s"] + first["embed_text"] + first["embed_image"],
        # What a tag such as CLIP_PRETRAINED=openai (the image's weights) would take: no file to hash.
        "total_without_hash_s": interpreter
        + imports
        + measured["init_s"]
        - measured["weights_id_s"]
        + first["embed_text"]
        + first["embed_image"],
        "harness_s": measured["harness_s"],
        "peak_rss_mb": measured["peak_rss_mb"],
    }


def torch_floor_once(env: dict[str, str], folder: Path) -> dict[str, float]:
    spawned, measured = child("torch", env, {}, folder)
    return {
        "interpreter_s": measured["started"] - spawned,
        "import_torch_s": measured["imported"] - measured["started"],
        "total_s": measured["imported"] - spawned,
        "peak_rss_mb": measured["peak_rss_mb"],
    }


def bench_cold_start(args: argparse.Namespace, checkpoint: Path, cache_dir: Path, repeats: int) -> dict[str, Any]:
    env = clean_environment(function_environment(args.model, args.model_config, checkpoint, cache_dir))
    # The image's pip install compiles every module; let this repository's (an editable install
    # here) be compiled once and cached too, rather than on every start.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    settings = {
        "import_groups": IMPORT_GROUPS,
        "bucket": OUTPUT_BUCKET,
        "function": FUNCTION_NAME,
        "memory_mb": MEMORY_MB,
        "events": {
            "embed_text": str(EVENTS / "query-embed-text.json"),
            "embed_image": str(EVENTS / "query-embed-image.json"),
        },
    }
    runs, floors = [], []
    with moto_server() as endpoint, tempfile.TemporaryDirectory(prefix="query-bench-cold-") as folder:
        env["AWS_ENDPOINT_URL"] = endpoint
        for round_ in range(repeats):
            # Alternate who goes first, so neither always finds the page cache the other warmed.
            if round_ % 2 == 0:
                runs.append(cold_start_once(env, settings, Path(folder)))
                floors.append(torch_floor_once(env, Path(folder)))
            else:
                floors.append(torch_floor_once(env, Path(folder)))
                runs.append(cold_start_once(env, settings, Path(folder)))
    phases = [key for key in runs[0] if key != "import_groups_s"]
    fastest_run = {key: best([run[key] for run in runs]) for key in phases}
    fastest_run["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    groups = {name: best([run["import_groups_s"][name] for run in runs]) for name, _ in IMPORT_GROUPS}
    floor = {key: best([run[key] for run in floors]) for key in floors[0]}
    floor["peak_rss_mb"] = max(run["peak_rss_mb"] for run in floors)
    return {
        "repeats": repeats,
        "best": fastest_run,
        "import_groups_s": groups,
        "torch_import_floor": floor,
        "ratio_total_to_torch_floor": fastest_run["total_s"] / floor["total_s"],
        "runs": runs,
        "torch_floor_runs": floors,
    }


# ---------------------------------------------------------------------------------------------
# (2) warm latency


def bench_warm(
    args: argparse.Namespace, checkpoint: Path, cache_dir: Path, image_size: tuple[int, int], rows: int, repeats: int
) -> dict[str, Any]:
    photo = jpeg_photo(image_size)
    encoded = base64.b64encode(photo).decode()
    with entry_point(function_environment(args.model, args.model_config, checkpoint, cache_dir)) as entry:
        service = entry.service
        model = service.model
        data = shard(rows, model.dimensions, model.name, model.pretrained, STORED_BUCKET)
        key = keys.parquet_key(service.config.output_prefix, model.id, "bench", 0)
        service.s3.put_object(Bucket=OUTPUT_BUCKET, Key=key, Body=data)
        # What the indexer does once S3 tells it the shard is there.
        ingest_shards(service.store, service.s3, [keys.s3_url(OUTPUT_BUCKET, key)])

        events = {
            "embed_text": event("query-embed-text.json", body=json.dumps({"text": SEARCH_TEXT})),
            "embed_image": event("query-embed-image.json", body=json.dumps({"image": encoded})),
            "classify": event("query-classify.json", body=json.dumps({"image": encoded})),
            "search": event("query-search-text.json", query={"q": SEARCH_TEXT, "k": str(SEARCH_K)}),
        }

        def call(name: str) -> dict[str, Any]:
            elapsed, response = invoke(entry, events[name])
            if response["statusCode"] != 200:
                raise RuntimeError(f"{name}: status {response['statusCode']}: {response['body'][:500]}")
            return {"seconds": elapsed, "body": json.loads(response["body"])}

        network, preprocess, tokenizer = model.network, model.preprocess, model.tokenizer

        def reference_text() -> np.ndarray:
            with torch.inference_mode():
                return F.normalize(network.encode_text(tokenizer([SEARCH_TEXT])), dim=-1)[0].numpy()

        def reference_image() -> np.ndarray:
            pixels = preprocess(Image.open(io.BytesIO(photo))).unsqueeze(0)
            with torch.inference_mode():
                return F.normalize(network.encode_image(pixels), dim=-1)[0].numpy()

        # Warm both sides' code paths (the API's first calls are what (1) measures).
        api_text = np.array(call("embed_text")["body"], np.float32)
        api_image = np.array(call("embed_image")["body"], np.float32)
        ref_text, ref_image = reference_text(), reference_image()

        classify_first = call("classify")
        search_first = call("search")
        # What the first /classify would cost without the vectors baked into the image (a label set
        # other than the default, or an image built without them): the service's own embedding.
        started = time.perf_counter()
        label_vectors = LabelSet.embed(model, DEFAULT_LABELS).vectors
        labels_embed_s = time.perf_counter() - started
        stored = pq.read_table(io.BytesIO(data), columns=["url", "vector"])
        matrix = stored.column("vector").combine_chunks().flatten().to_numpy().reshape(stored.num_rows, -1)
        urls = stored.column("url").to_pylist()

        def reference_classify() -> list[str]:
            scores = reference_image() @ label_vectors.T
            return [DEFAULT_LABELS[i] for i in np.argsort(-scores, kind="stable")[: service.config.top_k]]

        def reference_search() -> list[str]:
            scores = matrix @ reference_text()
            top = np.argpartition(-scores, SEARCH_K - 1)[:SEARCH_K]
            return [urls[i] for i in top[np.argsort(-scores[top], kind="stable")]]

        seconds: dict[str, float] = {}
        references: tuple[tuple[str, Callable[[], object]], ...] = (
            ("embed_text", reference_text),
            ("embed_image", reference_image),
            ("classify", reference_classify),
            ("search", reference_search),
        )
        for request, reference in references:
            # Each request against its own reference, pair by pair.
            seconds |= fastest({request: functools.partial(call, request), f"reference_{request}": reference}, repeats)
        classified = [label["label"] for label in call("classify")["body"]["images"]["image"]]
        found = call("search")["body"]

    latency = {
        "embed_text": seconds["embed_text"],
        "embed_image": seconds["embed_image"],
        "classify_first": classify_first["seconds"],
        "labels_not_baked": labels_embed_s,
        "classify": seconds["classify"],
        "search_first": search_first["seconds"],
        "search": seconds["search"],
    }
    reference_s = {
        "text": seconds["reference_embed_text"],
        "image": seconds["reference_embed_image"],
        "classify": seconds["reference_classify"],
        "search": seconds["reference_search"],
    }
    return {
        "repeats": repeats,
        "image": {
            "size": f"{image_size[0]}x{image_size[1]}",
            "jpeg_kib": len(photo) / 1024,
            "request_body_kib": len(events["embed_image"]["body"]) / 1024,
        },
        "labels": len(DEFAULT_LABELS),
        "rows": rows,
        "shard_mb": len(data) / MB,
        "latency_s": latency,
        "reference_s": reference_s,
        "ratios": {
            "embed_text": latency["embed_text"] / reference_s["text"],
            "embed_image": latency["embed_image"] / reference_s["image"],
            "classify_first_to_classify": latency["classify_first"] / latency["classify"],
            "classify": latency["classify"] / reference_s["classify"],
            "search": latency["search"] / reference_s["search"],
            "search_first_to_search": latency["search_first"] / latency["search"],
        },
        "checks": {
            "text_cosine": float(api_text @ ref_text),
            "image_cosine": float(api_image @ ref_image),
            "classify_top_labels_agree": classified == reference_classify(),
            "search_results_agree": [result["url"] for result in found["results"]] == reference_search(),
            "search_indexed": found["indexed"],
        },
    }


# ---------------------------------------------------------------------------------------------
# report


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def report(results: dict[str, Any]) -> str:
    env, cold, warm, sizes = results["environment"], results["cold_start"], results["warm"], results["sizes"]
    b, floor = cold["best"], cold["torch_import_floor"]
    lines = [
        f"{results['model']} from a checkpoint file ({results['pretrained']}), on the CPU: {env['cpu_count']} cores, "
        f"{env['torch_threads']} torch threads, Python {env['python']}, torch {env['torch']}, open_clip {env['open_clip']}, "
        f"fastapi {env['fastapi']}, mangum {env['mangum']}; commit {env['commit']}, {env['date']}",
        "",
        f"(1) cold start in a fresh process, best of {cold['repeats']} per phase (ms)",
        f"  (a) interpreter start            {ms(b['interpreter_s'])}",
        f"      imports                      {ms(b['imports_s'])}",
    ]
    lines += [f"        {name:<26} {ms(seconds)}" for name, seconds in cold["import_groups_s"].items()]
    lines += [
        f"  (b) import lambda_function       {ms(b['init_s'])}   of which the model load {ms(b['model_load_s']).strip()}, "
        f"hashing the checkpoint file {ms(b['hash_checkpoint_s']).strip()}",
        f"  (c) first /embed text            {ms(b['first_embed_text_s'])}",
        f"      first /embed image           {ms(b['first_embed_image_s'])}   (events/query-embed-image.json, 96x64)",
        f"      total                        {ms(b['total_s'])}   (best run; peak RSS {b['peak_rss_mb']:.0f} MB)",
        f"      total less the hashing       {ms(b['total_without_hash_s'])}   (a tag such as openai names the weights without reading them)",
        f"  floor: python -c 'import torch'  {ms(floor['total_s'])}   (interpreter {ms(floor['interpreter_s']).strip()}"
        f" + import {ms(floor['import_torch_s']).strip()}; peak RSS {floor['peak_rss_mb']:.0f} MB)",
        f"  total / torch floor              {cold['ratio_total_to_torch_floor']:9.2f}x",
        "",
    ]
    lat, ref, ratio = warm["latency_s"], warm["reference_s"], warm["ratios"]
    checkpoint_label = f"checkpoint file, fp32 ({results['model']})"
    image = warm["image"]
    lines += [
        f"(2) warm latency through lambda_function.handler, best of {warm['repeats']} (ms); reference: open_clip on the same model",
        f"  image: {image['size']} JPEG q{JPEG_QUALITY}, {image['jpeg_kib']:.0f} KiB ({image['request_body_kib']:.0f} KiB base64 JSON); "
        f"search over {warm['rows']:,} vectors ({warm['shard_mb']:.1f} MB shard); {warm['labels']} default labels",
        f"  {'request':<34} {'API':>9} {'reference':>10} {'API/ref':>8}",
        f"  {'POST /embed text':<34} {ms(lat['embed_text'])} {ms(ref['text']):>10} {ratio['embed_text']:7.2f}x",
        f"  {'POST /embed image':<34} {ms(lat['embed_image'])} {ms(ref['image']):>10} {ratio['embed_image']:7.2f}x",
        f"  {'POST /classify, first (baked labels)':<34} {ms(lat['classify_first'])} {'':>10} "
        f"{ratio['classify_first_to_classify']:7.2f}x   one call; ratio to a later /classify",
        f"  {'  labels not baked: LabelSet.embed':<34} {ms(lat['labels_not_baked'])} {'':>10} {'':>8}   "
        f"once; what a first /classify adds without baked vectors",
        f"  {'POST /classify':<34} {ms(lat['classify'])} {ms(ref['classify']):>10} {ratio['classify']:7.2f}x",
        f"  {'GET /search, first (loads shard)':<34} {ms(lat['search_first'])} {'':>10} "
        f"{ratio['search_first_to_search']:7.1f}x   one call; ratio to a later search",
        f"  {f'GET /search k={SEARCH_K}':<34} {ms(lat['search'])} {ms(ref['search']):>10} {ratio['search']:7.2f}x",
        f"  checks: cosine API/reference text {warm['checks']['text_cosine']:.6f}, image {warm['checks']['image_cosine']:.6f}; "
        f"same top labels {warm['checks']['classify_top_labels_agree']}; same search results {warm['checks']['search_results_agree']}",
        "",
        "(3) sizes (MB = 10^6 bytes; installed files as each distribution's RECORD lists them)",
        f"  {checkpoint_label:<40} {sizes['checkpoint_mb']:9.1f}",
        f"  {'default labels text vectors (baked)':<40} {sizes['baked_label_vectors_mb']:9.1f}",
        f"  API dependencies (not torch)             {sizes['totals_mb']['api_dependencies']:9.1f}   "
        + ", ".join(f"{name} {size:.0f}" for name, size in list(sizes["api_dependencies"].items())[:6]),
        f"  torch's own requirements                 {sizes['totals_mb']['torch_requirements']:9.1f}   "
        + ", ".join(f"{name} {size:.0f}" for name, size in list(sizes["torch_requirements"].items())[:4]),
        f"  project code (4 packages)                {sizes['totals_mb']['project_code']:9.1f}",
        f"  {'sum of the above':<40} {image_mb(sizes):9.1f}   + the CPU torch build + the base image",
        f"  torch + torchvision, CUDA build here     {sizes['totals_mb']['torch_cuda_build']:9.1f}   not what the image installs (CPU build)",
        f"  {'CUDA libraries (nvidia-*, cuda-*, triton)':<40} {sizes['totals_mb']['cuda_libraries']:9.1f}   not in the image",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a small photo and shard, one repeat")
    parser.add_argument("--repeats", type=positive, help="cold starts of each kind, the best kept (default 3; 1 with --quick)")
    parser.add_argument(
        "--warm-repeats", type=positive, help="calls of each warm request, the best kept (default 20; 2 with --quick)"
    )
    parser.add_argument("--rows", type=positive, help="stored vectors /search ranks (default 100000; 2000 with --quick)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    parser.add_argument("--model-config", help="an extra open_clip model config, as CLIP_MODEL_CONFIG")
    parser.add_argument(
        "--pretrained", type=Path, help="an existing checkpoint file (default: seeded random weights saved to a temporary one)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    warm_repeats = args.warm_repeats or (2 if args.quick else 20)
    rows = args.rows or (2_000 if args.quick else 100_000)
    image_size = QUICK_IMAGE if args.quick else FULL_IMAGE
    if args.model_config:
        open_clip.add_model_config(args.model_config)
    with tempfile.TemporaryDirectory(prefix="query-bench-") as folder:
        if args.pretrained:
            checkpoint, pretrained = args.pretrained.resolve(), f"checkpoint {args.pretrained.name}"
        else:
            checkpoint, pretrained = (
                save_random_checkpoint(args.model, Path(folder) / f"{args.model}-random.pt"),
                "seeded random weights",
            )
        # As the image's build does (functions/query/Dockerfile): the default labels' text vectors
        # computed once into CLIP_CACHE_DIR, where the function's first /classify finds them.
        cache_dir = Path(folder) / "clip-cache"
        started = time.perf_counter()
        bake.main([args.model, str(checkpoint), str(cache_dir)])
        bake_s = time.perf_counter() - started
        results = {
            "model": args.model,
            "pretrained": pretrained,
            "environment": environment(),
            "bake_s": bake_s,
            "cold_start": bench_cold_start(args, checkpoint, cache_dir, repeats),
            "warm": bench_warm(args, checkpoint, cache_dir, image_size, rows, warm_repeats),
            "sizes": bench_sizes(checkpoint, cache_dir),
        }
    print(report(results))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
