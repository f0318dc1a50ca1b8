"""How much faster the Batch worker is than the obvious open_clip code, on real photos.

(a) decode + preprocess: the worker's `decoder.decode` (which lets libjpeg decode big JPEGs at
    reduced scale) then open_clip's transform, against open_clip's transform on
    `PIL.Image.open`; images/s of each, their ratio, how far apart the two tensors are, and how
    close the model's embeddings of the two stay.
(b) end to end on an in-process moto S3: `clip_worker.runner.run` against a naive loop that
    downloads, opens, preprocesses, embeds and uploads one image at a time; same model, same
    weights. The worker also runs once more with its decoding in this process instead of the
    sandbox's helper processes (what it did before the budget per object): their ratio is what the
    budget costs a job.
(c) the sandbox per image: decode + preprocess in this process against the same call in a sandbox
    helper (pickling the bytes there and the 8-bit crop back over pipes, normalised here), one at a time.

(b) and (c) also count the CPU time each side spent (this process and the helpers, from the kernel's
accounting): on a machine shared with other work, waiting for a core inflates the wall-clock ratios
(each call wakes two processes), while the CPU time is what the sandbox adds to the work itself.

Both sides of each comparison run in this process, taking turns, and each keeps its fastest of
several tries (per image in (a), per job in (b)), so the ratios hold even when the machine's
absolute speed wobbles.

    python bench/worker_bench.py                 # the full run recorded in docs/benchmarks.md
    python bench/worker_bench.py --quick         # a smoke run that takes seconds
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import numpy as np
import open_clip
import PIL
import pyarrow.parquet as pq
import skimage
import torch
import torch.nn.functional as F
from moto import mock_aws
from PIL import Image, ImageOps

from clip_shared import keys
from clip_shared.manifest import Manifest, ManifestEntry, split
from clip_worker import decoder, log, runner
from clip_worker.config import WorkerConfig
from clip_worker.model import ClipModel, default_batch_size, load
from clip_worker.sandbox import Sandbox

PHOTOS = Path(skimage.__file__).parent / "data"
#: scikit-image's colour photographs, less motorcycle_right (the stereo twin of motorcycle_left);
#: its other images are grayscale or synthetic.
PHOTO_NAMES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
#: Mirror images and rotations make every uploaded object a different picture (some portrait).
VARIANTS: tuple[Image.Transpose | None, ...] = (None, *Image.Transpose)
JPEG_QUALITY = 90
FULL_SIZES = ((4000, 3000), (1600, 1200))
QUICK_SIZES = ((640, 480),)
INPUT_BUCKET = "bench-input"
OUTPUT_BUCKET = "bench-output"
TARGET_DECODE_SPEEDUP = 3.0
TARGET_MIN_COSINE = 0.999
TARGET_END_TO_END_SPEEDUP = 1.5

T = TypeVar("T")


@dataclass(frozen=True)
class DecodeResult:
    size: str
    megapixels: float
    images: int
    mean_jpeg_kib: float
    worker_images_per_s: float
    reference_images_per_s: float
    speedup: float
    #: In the units of the normalised tensor the model sees (one 8-bit level is about 0.015).
    max_abs_diff: float
    mean_abs_diff: float
    min_cosine: float


@dataclass(frozen=True)
class EndToEndResult:
    size: str
    images: int
    mean_jpeg_kib: float
    batch_size: int
    io_threads: int
    worker_images_per_s: float
    naive_images_per_s: float
    speedup: float
    #: Between the vectors the worker and the naive loop wrote for the same objects.
    min_cosine: float
    #: The worker with its decoding in this process, not in the sandbox's helpers.
    unsandboxed_images_per_s: float
    #: Time with the sandbox over time without it (1.05 = 5 % slower).
    sandbox_cost: float
    #: CPU time (this process and the helpers) with the sandbox over that without it.
    sandbox_cpu_cost: float
    #: Seconds the sandbox's helpers take to start, which a job overlaps with loading its model.
    sandbox_start_s: float


@dataclass(frozen=True)
class SandboxResult:
    size: str
    images: int
    in_process_images_per_s: float
    sandboxed_images_per_s: float
    #: Time in a helper over time in this process, per image.
    cost: float
    #: CPU milliseconds an image, mean of every try: in this process, and in the helper and this process together.
    in_process_cpu_ms: float
    sandboxed_cpu_ms: float
    cpu_cost: float


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def camera_sized(names: Sequence[str], size: tuple[int, int]) -> list[Image.Image]:
    """Real photos cropped to the camera's aspect ratio and resized to `size` (width, height)."""
    return [ImageOps.fit(Image.open(PHOTOS / name).convert("RGB"), size, Image.Resampling.LANCZOS) for name in names]


def variants(images: Sequence[Image.Image], count: int) -> list[bytes]:
    """`count` JPEGs cycling through `images`, then through their mirror images and rotations."""
    files = []
    for index in range(count):
        image = images[index % len(images)]
        variant = VARIANTS[(index // len(images)) % len(VARIANTS)]
        files.append(jpeg(image if variant is None else image.transpose(variant)))
    return files


def fastest(sides: dict[str, Callable[[T], object]], units: Sequence[T], repeats: int) -> dict[str, float]:
    """Seconds each side takes over all `units`, counting the fastest of `repeats` tries at each.

    The sides take turns at every unit, swapping who goes first each round, so a burst of load
    from elsewhere on the machine or a warm cache falls on both alike, and the per-unit minimum
    keeps such bursts out of the totals.
    """
    best = {name: [math.inf] * len(units) for name in sides}
    turns = list(sides.items())
    for round_ in range(repeats):
        for position, unit in enumerate(units):
            for name, work in turns if round_ % 2 == 0 else turns[::-1]:
                started = time.perf_counter()
                work(unit)
                best[name][position] = min(best[name][position], time.perf_counter() - started)
    return {name: sum(seconds) for name, seconds in best.items()}


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time (user and system) so far of this process, all its threads, and of the processes `pids`."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            # utime and stime, the 14th and 15th fields, counted after the command name in parentheses.
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_counted(work: Callable[[T], object], pids: Sequence[int], spent: list[float]) -> Callable[[T], object]:
    """`work`, adding the CPU time each call takes here and in `pids` to `spent`."""

    def counted(unit: T) -> object:
        before = cpu_seconds(pids)
        try:
            return work(unit)
        finally:
            spent.append(cpu_seconds(pids) - before)

    return counted


@contextmanager
def single_threaded() -> Iterator[None]:
    # Pillow decodes and resizes on one thread; capping torch too makes (a) a per-core figure.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bench_decode(model: ClipModel, size: tuple[int, int], files: list[bytes], repeats: int) -> DecodeResult:
    max_pixels = WorkerConfig.max_image_pixels

    def worker(data: bytes) -> torch.Tensor:
        # What prepare.prepare does between the download and the batch.
        return model.preprocess(decoder.decode(data, "s3://bench/photo.jpg", model.image_size, max_pixels))

    def reference(data: bytes) -> torch.Tensor:
        return model.preprocess(Image.open(io.BytesIO(data)))

    with single_threaded():
        seconds = fastest({"worker": worker, "reference": reference}, files, repeats)
    ours = torch.stack([worker(data) for data in files])
    theirs = torch.stack([reference(data) for data in files])
    difference = (ours - theirs).abs()
    cosines = (model.embed(ours) * model.embed(theirs)).sum(axis=1)
    return DecodeResult(
        size=f"{size[0]}x{size[1]}",
        megapixels=round(size[0] * size[1] / 1e6, 2),
        images=len(files),
        mean_jpeg_kib=round(sum(map(len, files)) / len(files) / 1024, 1),
        worker_images_per_s=round(len(files) / seconds["worker"], 2),
        reference_images_per_s=round(len(files) / seconds["reference"], 2),
        speedup=round(seconds["reference"] / seconds["worker"], 2),
        max_abs_diff=round(float(difference.max()), 4),
        mean_abs_diff=round(float(difference.mean()), 5),
        min_cosine=round(float(cosines.min()), 6),
    )


def bench_sandbox(
    model: ClipModel, config: WorkerConfig, size: tuple[int, int], files: list[bytes], repeats: int
) -> SandboxResult:
    url, max_pixels = "s3://bench/photo.jpg", config.max_image_pixels

    def in_process(data: bytes) -> torch.Tensor:
        return model.prepare(data, url, max_pixels)

    with Sandbox(config.decode_limits, 1) as sandbox:

        def sandboxed(data: bytes) -> torch.Tensor:
            return model.prepare(data, url, max_pixels, sandbox)

        if not torch.equal(sandboxed(files[0]), in_process(files[0])):
            raise RuntimeError("the sandbox's helper made another model input than this process")
        pids = sandbox.pids
        spent: dict[str, list[float]] = {"in process": [], "sandboxed": []}
        sides = {"in process": in_process, "sandboxed": sandboxed}
        with single_threaded():
            seconds = fastest({name: cpu_counted(work, pids, spent[name]) for name, work in sides.items()}, files, repeats)
    cpu_ms = {name: 1000 * sum(values) / len(values) for name, values in spent.items()}
    return SandboxResult(
        size=f"{size[0]}x{size[1]}",
        images=len(files),
        in_process_images_per_s=round(len(files) / seconds["in process"], 2),
        sandboxed_images_per_s=round(len(files) / seconds["sandboxed"], 2),
        cost=round(seconds["sandboxed"] / seconds["in process"], 3),
        in_process_cpu_ms=round(cpu_ms["in process"], 2),
        sandboxed_cpu_ms=round(cpu_ms["sandboxed"], 2),
        cpu_cost=round(cpu_ms["sandboxed"] / cpu_ms["in process"], 3),
    )


class InProcess:
    """Stands in for sandbox.Sandbox: each call runs in this process, under no budget."""

    def __init__(self, *_: object) -> None:
        pass

    def run(self, what: str, function: Callable[..., T], *args: Any) -> T:
        return function(*args)

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *_: object) -> None:
        pass


class Started(InProcess):
    """Hands run() a sandbox started once: a job starts its helpers while it loads its model, which
    the bench does not time (it hands run() the model already loaded)."""

    sandbox: Sandbox

    def run(self, what: str, function: Callable[..., T], *args: Any) -> T:
        return self.sandbox.run(what, function, *args)


@contextmanager
def quiet_worker() -> Iterator[None]:
    # The worker logs every job it runs; the table is what this script is for.
    level = log.logger.log_level
    log.logger.setLevel("WARNING")
    try:
        yield
    finally:
        log.logger.setLevel(level)


@contextmanager
def moto_s3() -> Iterator[None]:
    """S3 in this process, whatever AWS settings the calling shell has."""
    with mock.patch.dict(os.environ, {"AWS_DEFAULT_REGION": "us-east-1"}), mock_aws():
        # An endpoint or profile of the developer's would send requests past moto, to a real service.
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            os.environ.pop(name, None)
        yield


def upload(s3: Any, files: list[bytes]) -> Manifest:
    """The photos in the input bucket, and the one-child job's manifest file in the output bucket."""
    entries = []
    for index, data in enumerate(files):
        key = f"photos/{index:05d}.jpg"
        etag = s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=data)["ETag"].strip('"')
        entries.append(ManifestEntry(bucket=INPUT_BUCKET, key=key, size=len(data), etag=etag, mime_type="image/jpeg"))
    (manifest,) = split("bench", entries, len(entries))
    s3.put_object(
        Bucket=OUTPUT_BUCKET, Key=keys.manifest_prefix("", "bench") + keys.manifest_shard_name(0), Body=manifest.to_json()
    )
    return manifest


def naive_loop(s3: Any, model: ClipModel, entries: Sequence[ManifestEntry], prefix: str) -> None:
    """The obvious open_clip script: one image at a time, start to finish."""
    for entry in entries:
        data = s3.get_object(Bucket=entry.bucket, Key=entry.key)["Body"].read()
        pixels = model.preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)
        with torch.inference_mode():
            vector = F.normalize(model.network.encode_image(pixels), dim=-1)[0]
        key = keys.vector_key(prefix, model.id, entry.bucket, entry.key)
        s3.put_object(Bucket=OUTPUT_BUCKET, Key=key, Body=json.dumps(vector.tolist()).encode())


def naive_vectors(s3: Any, model: ClipModel, entries: Sequence[ManifestEntry], prefix: str) -> np.ndarray:
    return np.array(
        [
            json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=keys.vector_key(prefix, model.id, e.bucket, e.key))["Body"].read())
            for e in entries
        ]
    )


def worker_vectors(s3: Any, model: ClipModel, prefix: str) -> np.ndarray:
    """The worker's shard, in manifest order (which is the order it writes its rows in)."""
    body = s3.get_object(Bucket=OUTPUT_BUCKET, Key=keys.parquet_key(prefix, model.id, "bench", 0))["Body"].read()
    return np.array(pq.read_table(io.BytesIO(body)).column("vector").to_pylist())


def bench_end_to_end(
    model: ClipModel, config: WorkerConfig, size: tuple[int, int], files: list[bytes], repeats: int
) -> EndToEndResult:
    with moto_s3():
        s3 = runner.s3_client(config)
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        manifest = upload(s3, files)
        config = replace(config, manifest_uri=keys.s3_url(OUTPUT_BUCKET, keys.manifest_prefix("", "bench")))
        # A fresh output prefix per run, or the worker would find the last run's outputs and skip the work.
        worker_runs, naive_runs = itertools.count(), itertools.count()

        def worker(job: Manifest) -> None:
            summary = runner.run(replace(config, output_prefix=f"worker-{next(worker_runs)}/"), s3=s3)
            if summary.exit_code != runner.EXIT_OK or summary.progress.embedded != len(job.entries):
                raise RuntimeError(f"the worker did not embed every image: {summary.progress.fields()}")

        def naive(job: Manifest) -> None:
            naive_loop(s3, model, job.entries, f"naive-{next(naive_runs)}/")

        def unsandboxed(job: Manifest) -> None:
            with mock.patch.object(runner, "Sandbox", InProcess):
                worker(job)

        started = time.perf_counter()
        with Sandbox(config.decode_limits, config.decode_processes) as sandbox:
            for _ in range(sandbox.workers):  # each helper in turn: every one has started
                sandbox.run("start", len, b"")
            start_s = time.perf_counter() - started
            Started.sandbox = sandbox
            pids = sandbox.pids
            spent: dict[str, list[float]] = {"worker": [], "unsandboxed": [], "naive": []}
            sides = {"worker": worker, "unsandboxed": unsandboxed, "naive": naive}
            # run() loads its model itself; handing it the one already loaded keeps loading out of
            # the timing and guarantees every side uses the very same weights.
            with mock.patch.object(runner, "load", return_value=model), mock.patch.object(runner, "Sandbox", Started):
                # The whole job is one unit: the worker's speed comes from overlapping the images.
                counted = {name: cpu_counted(work, pids, spent[name]) for name, work in sides.items()}
                seconds = fastest(counted, [manifest], repeats)
        ours = worker_vectors(s3, model, "worker-0/")
        theirs = naive_vectors(s3, model, manifest.entries, "naive-0/")
    return EndToEndResult(
        size=f"{size[0]}x{size[1]}",
        images=len(files),
        mean_jpeg_kib=round(sum(map(len, files)) / len(files) / 1024, 1),
        batch_size=config.batch_size or default_batch_size(model.device),
        io_threads=config.io_threads,
        worker_images_per_s=round(len(files) / seconds["worker"], 2),
        naive_images_per_s=round(len(files) / seconds["naive"], 2),
        speedup=round(seconds["naive"] / seconds["worker"], 2),
        min_cosine=round(float((ours * theirs).sum(axis=1).min()), 6),
        unsandboxed_images_per_s=round(len(files) / seconds["unsandboxed"], 2),
        sandbox_cost=round(seconds["worker"] / seconds["unsandboxed"], 3),
        sandbox_cpu_cost=round(sum(spent["worker"]) / sum(spent["unsandboxed"]), 3),
        sandbox_start_s=round(start_s, 2),
    )


def environment(model: ClipModel) -> dict[str, Any]:
    return {
        "model": model.name,
        "pretrained": model.pretrained,
        "device": str(model.device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "pillow": PIL.__version__,
    }


def targets(decode: list[DecodeResult], end_to_end: EndToEndResult) -> list[tuple[str, bool]]:
    largest = decode[0]
    return [
        (
            f"decode+preprocess {largest.size} >= {TARGET_DECODE_SPEEDUP}x reference: {largest.speedup}x",
            largest.speedup >= TARGET_DECODE_SPEEDUP,
        ),
        (
            f"embedding cosine vs reference >= {TARGET_MIN_COSINE}: {largest.min_cosine}",
            largest.min_cosine >= TARGET_MIN_COSINE,
        ),
        (
            f"end to end >= {TARGET_END_TO_END_SPEEDUP}x naive loop: {end_to_end.speedup}x",
            end_to_end.speedup >= TARGET_END_TO_END_SPEEDUP,
        ),
    ]


def report(
    env: dict[str, Any],
    repeats: int,
    decode: list[DecodeResult],
    end_to_end: EndToEndResult,
    sandbox: list[SandboxResult],
    quick: bool,
) -> str:
    lines = [
        f"{env['model']} (pretrained={env['pretrained']}) on {env['device']}, {env['cpu_count']} cores, "
        f"torch {env['torch']}, open_clip {env['open_clip']}, Pillow {env['pillow']}",
        "",
        f"(a) decode + preprocess, 1 thread each, best of {repeats}; |diff| in normalised tensor units",
        f"{'size':>10} {'MP':>5} {'images':>6} {'KiB':>6} {'worker/s':>9} {'reference/s':>11} {'speedup':>8} "
        f"{'max|diff|':>9} {'mean|diff|':>10} {'min cosine':>10}",
    ]
    for row in decode:
        lines.append(
            f"{row.size:>10} {row.megapixels:>5} {row.images:>6} {row.mean_jpeg_kib:>6.0f} "
            f"{row.worker_images_per_s:>9.1f} {row.reference_images_per_s:>11.1f} {row.speedup:>7.2f}x "
            f"{row.max_abs_diff:>9.4f} {row.mean_abs_diff:>10.5f} {row.min_cosine:>10.6f}"
        )
    e2e = end_to_end
    lines += [
        "",
        f"(b) end to end on in-process moto S3: {e2e.images} JPEGs of {e2e.size} ({e2e.mean_jpeg_kib:.0f} KiB mean), "
        f"{env['torch_threads']} torch threads, best of {repeats}",
        f"{'':>12} {'images/s':>9}",
        f"{'naive loop':>12} {e2e.naive_images_per_s:>9.2f}   get, open, preprocess, encode a batch of 1, put; per image",
        f"{'worker':>12} {e2e.worker_images_per_s:>9.2f}   runner.run: batch {e2e.batch_size}, {e2e.io_threads} io threads",
        f"{'speedup':>12} {e2e.speedup:>8.2f}x   min cosine worker vs naive {e2e.min_cosine:.6f}",
        f"{'unsandboxed':>12} {e2e.unsandboxed_images_per_s:>9.2f}   the worker decoding in its own process, no budget",
        f"{'sandbox cost':>12} {e2e.sandbox_cost:>8.3f}x   worker time with / without the sandbox; its helpers start in "
        f"{e2e.sandbox_start_s} s, beside the model's loading",
        f"{'CPU cost':>12} {e2e.sandbox_cpu_cost:>8.3f}x   CPU time (worker and helpers) with / without the sandbox, every try",
        "",
        f"(c) the sandbox per image: decode + preprocess, 1 thread, one at a time, best of {repeats}",
        f"{'size':>10} {'images':>6} {'in process/s':>12} {'sandboxed/s':>11} {'cost':>7}"
        f" {'CPU ms in process':>17} {'sandboxed':>9} {'CPU cost':>8}",
        *(
            f"{row.size:>10} {row.images:>6} {row.in_process_images_per_s:>12.1f} {row.sandboxed_images_per_s:>11.1f} "
            f"{row.cost:>6.3f}x {row.in_process_cpu_ms:>17.2f} {row.sandboxed_cpu_ms:>9.2f} {row.cpu_cost:>7.3f}x"
            for row in sandbox
        ),
        "",
        "targets (set for the full run: 12 MP photos, ViT-B-32; a --quick run does not test them)" if quick else "targets",
    ]
    lines += [f"    {'met   ' if met else 'MISSED'} {text}" for text, met in targets(decode, end_to_end)]
    return "\n".join(lines)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small photos, few images, one repeat")
    parser.add_argument("--images", type=positive, help="objects embedded end to end (default 48; 4 with --quick)")
    parser.add_argument("--repeats", type=positive, help="runs of each side, the best kept (default 3; 1 with --quick)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    parser.add_argument("--model-config", help="an extra open_clip model config, as CLIP_MODEL_CONFIG")
    parser.add_argument("--pretrained", default="none", help="as CLIP_PRETRAINED (default none: seeded random weights)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    images = args.images or (4 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    config = WorkerConfig(
        manifest_uri="",
        output_bucket=OUTPUT_BUCKET,
        model=args.model,
        pretrained=args.pretrained,
        model_config_path=args.model_config,
        device="cpu",
    )
    model = load(config.model, config.pretrained, config.device, config.cache_dir, config.model_config_path)

    photos = {size: camera_sized(PHOTO_NAMES, size) for size in sizes}
    decode = [bench_decode(model, size, [jpeg(image) for image in photos[size]], repeats) for size in sizes]
    sandbox = [bench_sandbox(model, config, size, [jpeg(image) for image in photos[size]], repeats) for size in sizes]
    with quiet_worker():
        # End to end runs on the largest photos only: they are what the worker's decoding is built for.
        end_to_end = bench_end_to_end(model, config, sizes[0], variants(photos[sizes[0]], images), repeats)

    env = environment(model)
    print(report(env, repeats, decode, end_to_end, sandbox, args.quick))
    if args.json:
        results = {
            "environment": env,
            "repeats": repeats,
            "decode": [asdict(row) for row in decode],
            "end_to_end": asdict(end_to_end),
            "sandbox": [asdict(row) for row in sandbox],
            "targets": [{"target": text, "met": met} for text, met in targets(decode, end_to_end)],
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
