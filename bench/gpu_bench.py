"""Images/s from JPEG bytes to vectors: the worker's data path against a clip-retrieval-style reference
and against the model alone, per model and photo size, in one run on one machine.

(1) reference: clip-retrieval's recipe. A torch DataLoader whose worker processes do PIL.Image.open
    + open_clip's transform, batch 256, the fp32 model under fp16 autocast (on CUDA).
(2) worker: the worker's own code (prepare.model_input in threads, embed.Embedder on the main thread):
    on CUDA, the fp16 model, and JPEGs decoded with nvJPEG and cropped on the GPU (device_decode.py)
    where the worker decides to (GPU_DECODE=auto: a GPU with a hardware JPEG decoder; --decode forces).
(3) ceiling: the worker's model on pre-made input tensors already on the device.

All three read the same real photos (scikit-image's, as JPEGs) held in memory. (2)/(1) is how much
the worker gains on the reference, (2)/(3) how close its data path comes to keeping the model busy.
(1) and (2) run the same seeded random weights, so their vectors must agree (min cosine).

    python -m bench.gpu_bench --device cuda --cpus 4 --json out.json   # the issue's run, on a GPU box
    python -m bench.gpu_bench --quick --device cpu                     # a smoke run on any machine
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bench.worker_bench import PHOTO_NAMES, camera_sized, variants
from clip_shared.manifest import ManifestEntry
from clip_worker import device_decode
from clip_worker import embed as embed_stage
from clip_worker import prepare as prepare_stage
from clip_worker.config import WorkerConfig
from clip_worker.model import ClipModel, default_batch_size, load
from clip_worker.progress import Progress
from clip_worker.reader import ObjectVersion
from clip_worker.sandbox import Sandbox

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
MEGAPIXELS = (0.3, 2.0, 12.0)
#: clip-retrieval's default batch size.
REFERENCE_BATCH = 256
TARGET_VS_REFERENCE = 2.0  # ViT-B-32, 4 CPUs
TARGET_VS_CEILING = 0.8
T4_MEMORY_BYTES = 16 * 1024**3


@dataclass(frozen=True)
class Row:
    model: str
    megapixels: float
    size: str
    images: int
    mean_jpeg_kib: float
    reference_images_per_s: float
    worker_images_per_s: float
    ceiling_images_per_s: float
    worker_vs_reference: float
    worker_vs_ceiling: float
    #: Between the vectors (1) and (2) computed for the same photos.
    min_cosine: float


class Jpegs(Dataset[torch.Tensor]):
    """In-memory JPEG bytes -> open_clip's transform, as clip-retrieval's dataset does per item."""

    def __init__(self, files: Sequence[bytes], preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.files = files
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(Image.open(io.BytesIO(self.files[index])))


@contextmanager
def limited_cpus(count: int | None) -> Iterator[int]:
    """This process (and the DataLoader workers it forks) on `count` CPUs; yields the count used."""
    allowed = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    if count and count > len(allowed):
        raise SystemExit(f"--cpus {count}: this process may use only {len(allowed)} CPUs")
    try:
        os.sched_setaffinity(0, sorted(allowed)[: count or len(allowed)])
        torch.set_num_threads(count or len(allowed))
        yield count or len(allowed)
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(work: Callable[[], object], images: int, repeats: int, device: torch.device) -> tuple[float, Any]:
    """Images/s of the best of `repeats` timed runs, and the last result.

    An untimed run goes first: it starts DataLoader workers and thread pools, and warms kernels up.
    """
    work()
    best = math.inf
    result = None
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = work()
        sync(device)
        best = min(best, time.perf_counter() - started)
    return images / best, result


def reference(
    network: Any,
    preprocess: Callable[[Image.Image], torch.Tensor],
    files: Sequence[bytes],
    device: torch.device,
    cpus: int,
) -> Callable[[], np.ndarray]:
    loader = DataLoader(
        Jpegs(files, preprocess),
        batch_size=REFERENCE_BATCH,
        num_workers=cpus,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )

    def work() -> np.ndarray:
        vectors = []
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            for batch in loader:
                features = network.encode_image(batch.to(device, non_blocking=True))
                vectors.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(vectors).numpy()

    return work


def worker(model: ClipModel, files: Sequence[bytes], batch_size: int, decode: str) -> Callable[[], np.ndarray]:
    config = WorkerConfig(manifest_uri="", output_bucket="")
    transform = embed_stage.device_transform(model, {"auto": None, "device": True, "cpu": False}[decode])
    # As the worker decodes: in its helper processes, under its budget; they exit with this process.
    sandbox = Sandbox(config.decode_limits, config.decode_processes)
    held = device_decode.HeldBytes(config.device_jpeg_mb * 1024 * 1024)
    stage = prepare_stage.Stage(None, model, config, transform is not None, Progress(len(files), 60), sandbox, held)
    entries = [
        ManifestEntry(bucket="bench", key=f"{index:05d}.jpg", size=len(data), etag="bench", mime_type="image/jpeg")
        for index, data in enumerate(files)
    ]

    def prepare(index: int) -> prepare_stage.Prepared:
        entry = entries[index]
        return prepare_stage.Prepared(
            entry,
            ObjectVersion(entry.etag),
            prepare_stage.model_input(files[index], entry.url, stage),
        )

    def work() -> np.ndarray:
        # runner.run's loop without S3: the same window, threads, batches and embedder.
        embedder = embed_stage.Embedder(model, config.max_image_pixels, transform, sandbox, held)
        done: list[tuple[prepare_stage.Prepared, np.ndarray]] = []
        batch: list[prepare_stage.Prepared] = []
        window = 2 * batch_size + config.io_threads
        with ThreadPoolExecutor(config.io_threads) as pool:
            for item in prepare_stage.ahead(pool, range(len(files)), prepare, window, threading.Event()):
                batch.append(item)
                if len(batch) >= batch_size:
                    done += embed(embedder, batch)
                    batch = []
            if batch:
                done += embed(embedder, batch)
            done += embedder.finish()
        order = {entry.key: index for index, entry in enumerate(entries)}
        return np.stack([vector for _, vector in sorted(done, key=lambda pair: order[pair[0].entry.key])])

    return work


def embed(embedder: embed_stage.Embedder, batch: list[prepare_stage.Prepared]) -> list[tuple[prepare_stage.Prepared, np.ndarray]]:
    failed, done = embedder.submit(batch)
    if failed:
        raise RuntimeError(f"the worker could not embed bench photos: {failed}")
    return done


def ceiling(model: ClipModel, images: int, batch_size: int) -> Callable[[], None]:
    pixels = torch.randn(batch_size, 3, model.image_size, model.image_size, device=model.device, dtype=model.dtype)

    def work() -> None:
        for start in range(0, images, batch_size):
            model.encode(pixels[: min(batch_size, images - start)])

    return work


def size_for(megapixels: float) -> tuple[int, int]:
    """A 4:3 camera frame of about `megapixels` (12 MP: 4000x3000)."""
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    return width, round(width * 3 / 4)


def bench_model(
    name: str,
    pretrained: str,
    config_path: str | None,
    device: torch.device,
    photos: dict[float, list[bytes]],
    batch_size: int | None,
    cpus: int,
    repeats: int,
    decode: str,
) -> tuple[list[Row], int | None]:
    """One model's rows, and the worker's peak GPU memory (None off CUDA)."""
    images = len(next(iter(photos.values())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are the point here
        torch.manual_seed(0)  # the weights load() gives for CLIP_PRETRAINED=none, so (1) and (2)'s vectors compare
        network, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
        network.eval()
        references = {
            mp: best_rate(reference(network, preprocess, files, device, cpus), images, repeats, device)
            for mp, files in photos.items()
        }
        # The reference's fp32 model leaves the GPU before the worker's is measured.
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = load(name, pretrained, str(device), model_config_path=config_path)
    batch = batch_size or default_batch_size(device)
    ceiling_rate, _ = best_rate(ceiling(model, images, batch), images, repeats, device)
    rows = []
    for megapixels, files in photos.items():
        reference_rate, theirs = references[megapixels]
        worker_rate, ours = best_rate(worker(model, files, batch, decode), images, repeats, device)
        width, height = size_for(megapixels)
        rows.append(
            Row(
                model=name,
                megapixels=megapixels,
                size=f"{width}x{height}",
                images=images,
                mean_jpeg_kib=round(sum(map(len, files)) / len(files) / 1024, 1),
                reference_images_per_s=round(reference_rate, 1),
                worker_images_per_s=round(worker_rate, 1),
                ceiling_images_per_s=round(ceiling_rate, 1),
                worker_vs_reference=round(worker_rate / reference_rate, 2),
                worker_vs_ceiling=round(worker_rate / ceiling_rate, 2),
                min_cosine=round(float((ours * theirs).sum(axis=1).min()), 6),
            )
        )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return rows, peak


def targets(rows: list[Row], peaks: dict[str, int | None], cpus: int) -> list[tuple[str, bool]]:
    checks = [
        (
            f"{row.model} {row.megapixels} MP: worker/ceiling {row.worker_vs_ceiling} >= {TARGET_VS_CEILING}",
            row.worker_vs_ceiling >= TARGET_VS_CEILING,
        )
        for row in rows
    ]
    if cpus == 4:
        checks += [
            (
                f"ViT-B-32 {row.megapixels} MP, 4 CPUs: worker/reference {row.worker_vs_reference} >= {TARGET_VS_REFERENCE}",
                row.worker_vs_reference >= TARGET_VS_REFERENCE,
            )
            for row in rows
            if row.model == "ViT-B-32"
        ]
    if (large := peaks.get("ViT-L-14")) is not None:
        checks.append((f"ViT-L-14 peak GPU memory {large / 1024**3:.2f} GiB fits a 16 GB T4", large < T4_MEMORY_BYTES))
    return checks


def report(env: dict[str, Any], rows: list[Row], peaks: dict[str, int | None], checks: list[tuple[str, bool]]) -> str:
    lines = [
        f"device {env['device']}, {env['cpus']} CPUs used (of {env['cpu_count']}), torch {env['torch']}, "
        f"open_clip {env['open_clip']}, decode {env['decode']}, batch {env['batch_size']}, best of {env['repeats']}, "
        f"hardware JPEG decoder {'yes' if env['hardware_jpeg_decoder'] else 'no'}",
        f"(1) reference: DataLoader, {env['cpus']} worker processes, PIL + open_clip transform, batch {REFERENCE_BATCH}"
        + (", autocast fp16" if env["device"].startswith("cuda") else ", fp32"),
        "(2) worker: prepare.model_input + embed.Embedder   (3) ceiling: the model alone on pre-made tensors",
        "",
        f"{'model':>14} {'MP':>5} {'size':>10} {'images':>6} {'KiB':>6} {'(1) img/s':>10} {'(2) img/s':>10} "
        f"{'(3) img/s':>10} {'(2)/(1)':>8} {'(2)/(3)':>8} {'min cos':>9}",
    ]
    for row in rows:
        lines.append(
            f"{row.model:>14} {row.megapixels:>5} {row.size:>10} {row.images:>6} {row.mean_jpeg_kib:>6.0f} "
            f"{row.reference_images_per_s:>10.1f} {row.worker_images_per_s:>10.1f} {row.ceiling_images_per_s:>10.1f} "
            f"{row.worker_vs_reference:>7.2f}x {row.worker_vs_ceiling:>7.2f}x {row.min_cosine:>9.6f}"
        )
    lines.append("")
    for model, peak in peaks.items():
        lines.append(
            f"{model}: the worker's peak GPU memory (torch.cuda.max_memory_allocated) "
            + (f"{peak / 1024**3:.2f} GiB" if peak is not None else "n/a (not on CUDA)")
        )
    lines += ["", "targets" if env["device"].startswith("cuda") else "targets (set for --device cuda; not tested on a CPU)"]
    lines += [f"    {'met   ' if met else 'MISSED'} {text}" for text, met in checks]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated open_clip names (default {','.join(MODELS)})"
    )
    parser.add_argument("--model-config", help="an extra open_clip model config, as CLIP_MODEL_CONFIG")
    parser.add_argument("--pretrained", default="none", help="as CLIP_PRETRAINED (default none: seeded random weights)")
    parser.add_argument(
        "--sizes", default=",".join(map(str, MEGAPIXELS)), help="comma-separated megapixels (default 0.3,2.0,12.0)"
    )
    parser.add_argument("--images", type=int, help="photos per size (default 1024; 16 with --quick)")
    parser.add_argument("--batch-size", type=int, help="the worker's batch (default: model.default_batch_size)")
    parser.add_argument("--cpus", type=int, help="CPUs to use, as on g4dn.xlarge's 4 (default: all)")
    parser.add_argument(
        "--decode", choices=("auto", "device", "cpu"), default="auto", help="(2)'s decoding: the worker's choice, or forced"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed runs of each pipeline after a warm-up, the best kept (default 2; 1 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 0.3 MP only, 16 photos, one repeat")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.model_config:
        open_clip.add_model_config(args.model_config)  # the reference builds its model before load() would add it
    sizes = [float(mp) for mp in (("0.3",) if args.quick else args.sizes.split(","))]
    images = args.images or (16 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 2)
    photos = {mp: variants(camera_sized(PHOTO_NAMES, size_for(mp)), images) for mp in sizes}

    rows: list[Row] = []
    peaks: dict[str, int | None] = {}
    with limited_cpus(args.cpus) as cpus:
        for name in args.models.split(","):
            model_rows, peaks[name] = bench_model(
                name, args.pretrained, args.model_config, device, photos, args.batch_size, cpus, repeats, args.decode
            )
            rows += model_rows
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": cpus,
        "cpu_count": os.cpu_count(),
        "decode": args.decode,
        # What GPU_DECODE=auto goes by (docs/gpu.md).
        "hardware_jpeg_decoder": device_decode.hardware_jpeg_decoder(device),
        "batch_size": args.batch_size or default_batch_size(device),
        "repeats": repeats,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    env["device"] = f"cuda ({env['device']})" if device.type == "cuda" else "cpu"
    checks = targets(rows, peaks, cpus)
    print(report(env, rows, peaks, checks))
    if args.json:
        results = {
            "environment": env,
            "rows": [asdict(row) for row in rows],
            "peak_gpu_memory_bytes": peaks,
            "targets": [{"target": text, "met": met} for text, met in checks],
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
