"""The query API's limits against API Gateway's 29 s: the costliest request each endpoint accepts at
the configured limits (QueryConfig's defaults unless --quick), timed through the Lambda entry point
in this process, with the memory it takes, against a one-text and a one-photo /embed.

Each request is built from the loaded configuration's limits:
- embed_texts: MAX_ITEMS texts of about 75 tokens each, all the text tower reads, made of the
  vocabulary's longest pieces glued into one word: the costliest to tokenize of the texts that fit;
- embed_texts_truncated: MAX_ITEMS texts of MAX_TEXT_CHARS random letters, truncate=true: one
  word that long is the tokenizer's worst case (its cost grows with the square of a word's length);
- embed_one_image_<format>: one one-colour RGBA image of MAX_REQUEST_PIXELS in each format that
  decodes at full size (JPEG does not: libjpeg decodes big ones at 1/8 scale): the memory bound,
  and which format costs most;
- embed_images: MAX_ITEMS images in that format holding MAX_REQUEST_PIXELS together;
- similarity: one 75-token text and MAX_ITEMS - 1 such images;
- classify: MAX_ITEMS such images and MAX_LABELS labels of about 70 tokens each;
- search_text, search_image: GET /search with a 75-token query, POST /search with one image of
  MAX_REQUEST_PIXELS, k=MAX_RESULTS, over --rows stored vectors (loaded before: the first search
  of a container, which loads them, is query_bench's to measure);
- refused_*: the costliest refusals: every text tokenized and then the last one refused, and bodies
  of MAX_BODY_BYTES that nest arrays or list far too many labels.
Texts and labels are new on every call, as the tokenizer caches every word it has seen.

Each request keeps its best of --repeats. The projection to the template's default QueryMemorySize
(3008 MB, about 1.7 vCPUs' worth of time where this machine has cpu_count) scales every second by
cpu_count / 1.7, as if all of it were parallel (the tokenizer and the decoders use one core, which
a 3008 MB function also has whole); a cold start (query_bench: up to 10 s) comes on top.

    python -m bench.query_limits --json bench/out/limits.json   # the run recorded in docs/query-api.md
    python -m bench.query_limits --quick                        # a smoke run, at small limits
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import functools
import io
import json
import random
import string
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import open_clip
from PIL import Image

from bench._harness import environment, jpeg_photo, save_random_checkpoint, write_json
from bench.query_function import (
    MEMORY_MB,
    OUTPUT_BUCKET,
    STORED_BUCKET,
    TIMEOUT_S,
    entry_point,
    event,
    function_environment,
    invoke,
)
from bench.search_bench import shard
from bench.worker_bench import positive
from clip_shared import keys
from clip_store import ingest_shards
from clip_worker.labels import PROMPT
from clip_worker.model import ClipModel

#: Lambda's CPU share: one vCPU's worth of time per 1,769 MB.
MB_PER_VCPU = 1769
#: The slowest cold start bench.query_bench measured (docs/benchmarks.md), which a request that
#: starts a container waits for on top of its own time.
COLD_START_S = 9.6
#: Formats Pillow decodes at full size whatever the model needs, with an alpha channel to flatten.
FULL_DECODE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {}),
    "webp": ("WEBP", {"lossless": True}),
    "tiff": ("TIFF", {"compression": "tiff_adobe_deflate"}),
}
#: Limits of a smoke run, where the tiny test model stands in for ViT-B-32.
QUICK_LIMITS = {
    "MAX_ITEMS": "4",
    "MAX_REQUEST_PIXELS": "1000000",
    "MAX_TEXT_CHARS": "300",
    "MAX_LABELS": "6",
    "MAX_RESULTS": "20",
}
#: The typical request the worst are compared with: a 2 MP photo (a smaller one at the quick limits).
REFERENCE_PHOTO = {False: (1600, 1200), True: (640, 480)}


@dataclass(frozen=True)
class Limits:
    items: int
    request_pixels: int
    text_chars: int
    labels: int
    results: int
    body_bytes: int


def peak_rss_reset() -> float:
    """This process's resident memory now, in MB, after making it the new peak (Linux's clear_refs)."""
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")
    return rss_mb("VmRSS")


def rss_mb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as stream:
        return next(int(line.split()[1]) for line in stream if line.startswith(f"{field}:")) * 1024 / 1e6


def identity(request: dict[str, Any]) -> dict[str, Any]:
    return request


def image(pixels: int, kind: str) -> bytes:
    """A one-colour RGBA image of about `pixels` pixels, square, in `kind`'s format: a few kB at most."""
    side = int(pixels**0.5)
    name, options = FULL_DECODE_FORMATS[kind]
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (30, 120, 200, 128)).save(buffer, name, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Words:
    """Texts that fill the model's context and cost its tokenizer the most, and never repeat: one long
    word of the vocabulary's longest pieces glued together, which the BPE merges back piece by piece
    (random words cost it a tenth). They are fitted with a copy of the tokenizer, whose cache of
    every word it has seen would otherwise hand the API the answer."""

    def __init__(self, model: ClipModel, max_chars: int, seed: int = 0) -> None:
        self.fitting = dataclasses.replace(model, tokenizer=copy.deepcopy(model.tokenizer))
        self.max_chars = max_chars
        self.rng = random.Random(seed)
        vocabulary = getattr(model.tokenizer, "encoder", {})
        self.pieces = sorted(piece for piece in vocabulary if piece.isascii() and piece.isalpha() and len(piece) >= 8) or ["word"]

    def longest(self, prefix: str = "") -> str:
        """As many pieces as still fit the model's context, and MAX_TEXT_CHARS, after `prefix` (by bisection)."""
        pieces = self.rng.choices(self.pieces, k=2 * self.fitting.context_length)
        fitting, too_many = 0, len(pieces)
        while too_many - fitting > 1:
            middle = (fitting + too_many) // 2
            text = prefix + "".join(pieces[:middle])
            fitting, too_many = (
                (middle, too_many) if len(text) <= self.max_chars and self.fitting.text_fits(text) else (fitting, middle)
            )
        return "".join(pieces[:fitting])

    def letters(self, count: int) -> str:
        return "".join(self.rng.choices(string.ascii_lowercase, k=count))


def requests_for(limits: Limits, kind: str, words: Words) -> dict[str, Callable[[], dict[str, Any]]]:
    """Each measured request, as a function that builds a new event (new words every call)."""
    images = {f"image{n}": b64(image(limits.request_pixels // limits.items, kind)) for n in range(limits.items)}
    big = b64(image(limits.request_pixels, kind))

    def post(path: str, body: Any) -> dict[str, Any]:
        # A raw string is sent as it is: the refusals' bodies are not JSON documents json.dumps makes.
        return event("query-embed-text.json", path=path, body=body if isinstance(body, str) else json.dumps(body))

    return {
        "embed_texts": lambda: post("/embed", {"texts": [words.longest() for _ in range(limits.items)]}),
        "embed_texts_truncated": lambda: post(
            "/embed", {"texts": [words.letters(limits.text_chars) for _ in range(limits.items)], "truncate": True}
        ),
        "embed_images": lambda: post("/embed", {"images": images}),
        "similarity": lambda: post(
            "/similarity", {"texts": [words.longest()], "images": dict(list(images.items())[: limits.items - 1])}
        ),
        "classify": lambda: post(
            "/classify", {"images": images, "labels": [words.longest(PROMPT.format("")) for _ in range(limits.labels)]}
        ),
        "search_text": lambda: event("query-search-text.json", query={"q": words.longest(), "k": str(limits.results)}),
        "search_image": lambda: post("/search", {"image": big, "k": limits.results}),
        "refused_last_text": lambda: post(
            "/embed", {"texts": [*(words.longest() for _ in range(limits.items - 1)), words.letters(limits.text_chars)]}
        ),
        "refused_nested": lambda: post("/embed", "[" * (limits.body_bytes - 1)),
        "refused_labels": lambda: post("/classify", '{"labels": [' + "1," * ((limits.body_bytes - 20) // 2) + "1]}"),
    }


def measure(entry: ModuleType, build: Callable[[], dict[str, Any]], repeats: int, expected: int) -> dict[str, float]:
    """Best seconds of `repeats` calls, and the most memory any of them took (peak RSS, and its rise)."""
    seconds, peak, rise = [], 0.0, 0.0
    for _ in range(repeats):
        request = build()
        before = peak_rss_reset()
        elapsed, response = invoke(entry, request)
        if response["statusCode"] != expected:
            raise RuntimeError(f"status {response['statusCode']}, not {expected}: {response['body'][:500]}")
        seconds.append(elapsed)
        peak, rise = max(peak, rss_mb()), max(rise, rss_mb() - before)
    return {"seconds": min(seconds), "peak_rss_mb": peak, "rss_rise_mb": rise}


def bench(args: argparse.Namespace, checkpoint: Path, folder: Path) -> dict[str, Any]:
    env = function_environment(args.model, args.model_config, checkpoint, folder / "clip-cache")
    with entry_point({**env, **(QUICK_LIMITS if args.quick else {})}) as entry:
        service = entry.service
        config = service.config
        limits = Limits(
            config.max_items,
            config.max_request_pixels,
            config.max_text_chars,
            config.max_labels,
            config.max_results,
            config.max_body_bytes,
        )
        data = shard(args.rows, service.model.dimensions, service.model.name, service.model.pretrained, STORED_BUCKET)
        shard_key = keys.parquet_key("", service.model.id, "bench", 0)
        service.s3.put_object(Bucket=OUTPUT_BUCKET, Key=shard_key, Body=data)
        # What the indexer does once S3 tells it the shard is there.
        ingest_shards(service.store, service.s3, [keys.s3_url(OUTPUT_BUCKET, shard_key)])
        words = Words(service.model, limits.text_chars)
        photo = b64(jpeg_photo(REFERENCE_PHOTO[args.quick]))
        references = {
            "embed_one_text": lambda: event("query-embed-text.json", body=json.dumps({"text": words.longest()})),
            "embed_one_photo": lambda: event("query-embed-image.json", body=json.dumps({"image": photo})),
        }
        for build in references.values():  # the first calls warm the code paths up
            invoke(entry, build())
        results = {name: measure(entry, build, args.repeats, 200) for name, build in references.items()}
        formats = {}
        for kind in FULL_DECODE_FORMATS:
            request = event("query-embed-image.json", body=json.dumps({"image": b64(image(limits.request_pixels, kind))}))
            formats[kind] = results[f"embed_one_image_{kind}"] = measure(
                entry, functools.partial(identity, request), args.repeats, 200
            )
        costliest = max(formats, key=lambda kind: formats[kind]["seconds"])
        for name, build in requests_for(limits, costliest, words).items():
            results[name] = measure(entry, build, args.repeats, 400 if name.startswith("refused") else 200)
    cpus = environment()["cpu_count"] or 1
    scale = cpus / (MEMORY_MB / MB_PER_VCPU)
    for measured in results.values():
        measured["projected_s"] = measured["seconds"] * scale
        measured["projected_cold_s"] = measured["projected_s"] + COLD_START_S
        measured["to_photo"] = measured["seconds"] / results["embed_one_photo"]["seconds"]
    return {"limits": limits.__dict__, "costliest_format": costliest, "scale_to_default_memory": scale, "requests": results}


def report(results: dict[str, Any]) -> str:
    env, limits = results["environment"], results["limits"]
    worst = max(
        (name for name in results["requests"] if not name.startswith("refused")), key=lambda n: results["requests"][n]["seconds"]
    )
    lines = [
        f"{results['model']} ({results['pretrained']}) on the CPU: {env['cpu_count']} cores, torch {env['torch']}, "
        f"commit {env['commit']}, {env['date']}",
        "limits: "
        + ", ".join(f"{name} {value:,}" for name, value in limits.items())
        + f"; images: {results['costliest_format']} (the costliest)",
        f"best of {results['repeats']}; at {MEMORY_MB} MB = this x {results['scale_to_default_memory']:.2f}; "
        f"cold = that + {COLD_START_S} s of cold start; API Gateway gives up at {TIMEOUT_S + 1} s",
        "",
        f"  {'request':<26} {'seconds':>8} {'x photo':>8} {'at 3008':>8} {'cold':>7} {'peak RSS':>9} {'rise':>7}",
    ]
    for name, measured in results["requests"].items():
        lines.append(
            f"  {name:<26} {measured['seconds']:8.2f} {measured['to_photo']:8.1f} {measured['projected_s']:8.2f} "
            f"{measured['projected_cold_s']:7.1f} {measured['peak_rss_mb']:7.0f} MB {measured['rss_rise_mb']:5.0f} MB"
        )
    slowest = results["requests"][worst]
    lines += ["", f"  slowest accepted: {worst}, {slowest['projected_cold_s']:.1f} s cold at {MEMORY_MB} MB, of {TIMEOUT_S} s"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small limits, one repeat, a small index")
    parser.add_argument("--repeats", type=positive, help="calls of each request, the best kept (default 3; 1 with --quick)")
    parser.add_argument("--rows", type=positive, help="stored vectors the searches rank (default 100000; 2000 with --quick)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    parser.add_argument("--model-config", help="an extra open_clip model config, as CLIP_MODEL_CONFIG")
    parser.add_argument(
        "--pretrained", type=Path, help="a checkpoint file (default: seeded random weights saved to a temporary one)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rows = args.rows or (2_000 if args.quick else 100_000)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.model_config:
        open_clip.add_model_config(args.model_config)
    with tempfile.TemporaryDirectory(prefix="query-limits-") as folder:
        if args.pretrained:
            checkpoint, pretrained = args.pretrained.resolve(), f"checkpoint {args.pretrained.name}"
        else:
            checkpoint, pretrained = save_random_checkpoint(args.model, Path(folder) / "random.pt"), "seeded random weights"
        measured = bench(args, checkpoint, Path(folder))
    results = {"model": args.model, "pretrained": pretrained, "repeats": args.repeats, "environment": environment(), **measured}
    print(report(results))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
