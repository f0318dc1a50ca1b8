"""The job: read this child's shard, download and decode ahead of the model, embed in batches, write.

Threads download and decode (boto3 and Pillow release the GIL) while the main thread runs the
model, and another set of threads uploads results, so the accelerator never waits on one image.
On a GPU the threads only download and check JPEGs; the main thread decodes them a batch at a
time on the GPU (see gpu.py), since 4 vCPUs cannot decode as fast as the GPU embeds.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
import numpy as np
import torch
from aws_lambda_powertools import Logger
from botocore.config import Config

from clip_shared.events import DocumentError, ErrorCode, Keywords
from clip_shared.manifest import ManifestEntry, ManifestError
from clip_worker import gpu, reader
from clip_worker.config import ConfigError, WorkerConfig
from clip_worker.labels import PROMPT, LabelError, LabelSet, read_labels
from clip_worker.model import ClipModel, ModelLoadError, default_batch_size, load
from clip_worker.writer import OutputWriter, Row

logger = Logger(service="clip-worker")
# Powertools writes the JSON lines itself; a handler that open_clip's root-level logging calls add
# later (logging.basicConfig) would print every line a second time, unformatted, on stderr.
logging.getLogger(logger.name).propagate = False

EXIT_OK = 0
EXIT_FAILED = 1
#: 128 + SIGTERM, what a process stopped by SIGTERM conventionally reports.
EXIT_INTERRUPTED = 143

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Prepared:
    entry: ManifestEntry
    etag: str
    #: The model's input made on the CPU, or a JPEG left for the main thread to decode on the device.
    pixels: torch.Tensor | gpu.Jpeg


@dataclass(frozen=True)
class Finished:
    """Embedded by an earlier run for the same ETag and model: its stored vector is reused."""

    entry: ManifestEntry
    vector: np.ndarray


@dataclass(frozen=True)
class Failed:
    entry: ManifestEntry
    error: DocumentError


@dataclass
class Progress:
    total: int
    interval_s: float
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    write_errors: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_log: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.embedded + self.skipped + self.failed

    def fields(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        remaining = self.total - self.done
        return {
            "total": self.total,
            "done": self.done,
            "embedded": self.embedded,
            "skipped": self.skipped,
            "failed": self.failed,
            "write_errors": self.write_errors,
            "elapsed_s": round(elapsed, 2),
            "images_per_s": round(rate, 2),
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
        }

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            logger.info("progress", extra=self.fields())


@dataclass(frozen=True)
class Summary:
    exit_code: int
    progress: Progress
    shard_url: str | None


def ahead(pool: ThreadPoolExecutor, items: Iterable[T], work: Callable[[T], R], window: int, stop: threading.Event) -> Iterator[R]:
    """Results of `work` over `items` in completion order, at most `window` in flight; none started after `stop`."""
    pending: set[Future[R]] = set()
    remaining = iter(items)
    exhausted = False
    while True:
        while not exhausted and not stop.is_set() and len(pending) < window:
            item = next(remaining, None)
            if item is None:
                exhausted = True
            else:
                pending.add(pool.submit(work, item))
        if stop.is_set():
            # Work not yet started is abandoned; work under way is finished and kept.
            pending = {future for future in pending if not future.cancel()}
        if not pending:
            return
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()


def pixels(data: bytes, url: str, model: ClipModel, max_pixels: int, on_device: bool) -> torch.Tensor | gpu.Jpeg:
    """What the prepare threads make of an object's bytes: a JPEG for the device when it can take it."""
    jpeg = gpu.probe(data, max_pixels, pin=model.device.type == "cuda") if on_device else None
    return jpeg or model.prepare(data, url, max_pixels)


def unexpected(entry: ManifestEntry, exc: Exception) -> Failed:
    logger.exception("unexpected error preparing object", extra={"url": entry.url})
    return Failed(entry, DocumentError(ErrorCode.INTERNAL_ERROR, f"{entry.url}: {type(exc).__name__}: {exc}"))


def prepare(
    entry: ManifestEntry, s3: Any, writer: OutputWriter, model: ClipModel, config: WorkerConfig, on_device: bool
) -> Prepared | Finished | Failed:
    try:
        vector = writer.finished(entry)
        if vector is not None:
            return Finished(entry, vector)
        data, etag = reader.fetch(entry, s3, config.max_object_bytes)
        return Prepared(entry, etag, pixels(data, entry.url, model, config.max_image_pixels, on_device))
    except DocumentError as error:
        return Failed(entry, error)
    except Exception as exc:  # noqa: BLE001 - one object's surprise must not stop the others
        return unexpected(entry, exc)


class Embedder:
    """Batches of Prepared -> vectors, decoding the batch's JPEGs on the device first.

    A batch's vectors are read back only once the next batch is queued: on CUDA the model runs
    asynchronously, so the GPU embeds batch N while this thread decodes and crops batch N+1.
    """

    def __init__(self, model: ClipModel, max_pixels: int, transform: gpu.TensorTransform | None) -> None:
        self._model = model
        self._max_pixels = max_pixels
        self._transform = transform
        self._queued: tuple[list[Prepared], torch.Tensor] | None = None

    def submit(self, batch: list[Prepared]) -> tuple[list[Failed], list[tuple[Prepared, np.ndarray]]]:
        """Queue `batch`; returns its images that failed, and the vectors of the batch queued before it."""
        jpegs = [item.pixels for item in batch if isinstance(item.pixels, gpu.Jpeg)]
        on_device = iter(gpu.preprocess(jpegs, self._transform, self._model.device) if jpegs and self._transform else ())
        kept: list[Prepared] = []
        inputs: list[torch.Tensor] = []
        failed: list[Failed] = []
        for item in batch:
            tensor = item.pixels if isinstance(item.pixels, torch.Tensor) else next(on_device)
            if tensor is None:
                # The device decoder refused it: the CPU path decodes it, or says what is wrong with it.
                try:
                    tensor = self._model.prepare(item.pixels.data.numpy().tobytes(), item.entry.url, self._max_pixels)
                except DocumentError as error:
                    failed.append(Failed(item.entry, error))
                    continue
                except Exception as exc:  # noqa: BLE001 - as in prepare: one image never fails the batch
                    failed.append(unexpected(item.entry, exc))
                    continue
            kept.append(item)
            inputs.append(tensor.to(self._model.device, self._model.dtype, non_blocking=True))
        done = self.finish()
        if kept:
            self._queued = (kept, self._model.encode(torch.stack(inputs)))
        return failed, done

    def finish(self) -> list[tuple[Prepared, np.ndarray]]:
        """The vectors of the last batch queued (waiting for the device), and nothing left queued."""
        if self._queued is None:
            return []
        items, features = self._queued
        self._queued = None
        return list(zip(items, features.cpu().numpy()))


def device_transform(model: ClipModel, decode_on_device: bool | None) -> gpu.TensorTransform | None:
    """The tensor transform when JPEGs are to be decoded on the model's device, else None.

    None (the default) decodes on the device exactly when the model runs on CUDA.
    """
    if not (model.device.type == "cuda" if decode_on_device is None else decode_on_device):
        return None
    try:
        return gpu.TensorTransform.for_model(model)
    except gpu.UnsupportedTransform as exc:
        logger.warning("decoding on the CPU: this model's preprocessing has no tensor equivalent", extra={"reason": str(exc)})
        return None


def keywords(label_set: LabelSet | None, vectors: list[np.ndarray], k: int) -> list[Keywords | None]:
    """Each image's zero-shot keywords, the whole batch ranked in one matrix product; None when off."""
    if label_set is None or not vectors:
        return [None] * len(vectors)
    return [Keywords(ranked, PROMPT, len(label_set.labels)) for ranked in label_set.top(np.stack(vectors), k)]


def s3_client(config: WorkerConfig) -> Any:
    # Endpoint and region come from the standard settings (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION).
    return boto3.client(
        "s3",
        config=Config(
            max_pool_connections=2 * config.io_threads + 4,
            retries={"max_attempts": 8, "mode": "standard"},
        ),
    )


def run(config: WorkerConfig, stop: threading.Event | None = None, s3: Any = None) -> Summary:
    stop = stop or threading.Event()
    s3 = s3 or s3_client(config)
    manifest = reader.load_manifest(config.manifest_uri, s3)
    entries = manifest.shard(config.array_index)
    # Read before the weights load, so a bad label set fails the job at once.
    labels = read_labels(config.labels, s3) if config.labels else None
    model = load(config.model, config.pretrained, config.device, config.cache_dir, config.model_config_path)
    # The text tower runs once per job; each batch then costs one small matrix product.
    label_set = LabelSet.cached(model, labels, config.cache_dir) if labels else None
    writer = OutputWriter(s3, config.output_bucket, config.output_prefix, model, config.job_id or manifest.manifest_id)
    batch_size = config.batch_size or default_batch_size(model.device)
    transform = device_transform(model, config.gpu_decode)
    logger.info(
        "job started",
        extra={
            "manifest": config.manifest_uri,
            "array_index": config.array_index,
            "entries": len(entries),
            "model": model.name,
            "pretrained": model.pretrained,
            "device": str(model.device),
            "batch_size": batch_size,
            "decode_on_device": transform is not None,
            "labels": len(label_set.labels) if label_set else None,
        },
    )
    progress = Progress(total=len(entries), interval_s=config.progress_interval_s)
    rows: list[Row] = []
    writes: list[tuple[ManifestEntry, Future[None]]] = []

    with ThreadPoolExecutor(config.io_threads, "prepare") as prepare_pool, ThreadPoolExecutor(
        config.io_threads, "write"
    ) as write_pool:

        def fail(result: Failed) -> None:
            logger.warning("object failed", extra={"url": result.entry.url, "code": result.error.code, "reason": result.error.message})
            writes.append((result.entry, write_pool.submit(writer.failed, result.entry, result.error)))
            progress.failed += 1

        def embedded(done: list[tuple[Prepared, np.ndarray]]) -> None:
            vectors = [vector for _, vector in done]
            for (item, vector), words in zip(done, keywords(label_set, vectors, config.keywords_top_k)):
                rows.append(Row(item.entry, item.etag, vector))
                writes.append((item.entry, write_pool.submit(writer.created, item.entry, item.etag, vector, words)))
            progress.embedded += len(done)

        def embed(batch: list[Prepared]) -> None:
            failures, done = embedder.submit(batch)
            for failure in failures:
                fail(failure)
            embedded(done)

        embedder = Embedder(model, config.max_image_pixels, transform)
        batch: list[Prepared] = []
        window = 2 * batch_size + config.io_threads
        work = lambda entry: prepare(entry, s3, writer, model, config, transform is not None)  # noqa: E731
        for result in ahead(prepare_pool, entries, work, window, stop):
            if isinstance(result, Finished):
                rows.append(Row(result.entry, result.entry.etag, result.vector))
                progress.skipped += 1
            elif isinstance(result, Failed):
                fail(result)
            else:
                batch.append(result)
                if len(batch) >= batch_size:
                    embed(batch)
                    batch = []
            progress.tick()
        if batch:
            embed(batch)
        embedded(embedder.finish())

        for entry, future in writes:
            if (exc := future.exception()) is not None:
                progress.write_errors += 1
                logger.error("could not write outputs", extra={"url": entry.url, "reason": str(exc)})

    order = {entry.url: position for position, entry in enumerate(entries)}
    rows.sort(key=lambda row: order[row.entry.url])
    shard_url = writer.shard(manifest.manifest_id, config.array_index or 0, rows)
    interrupted = stop.is_set() and progress.done < progress.total
    exit_code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED if progress.write_errors else EXIT_OK
    logger.info(
        "job interrupted" if interrupted else "job finished",
        extra={**progress.fields(), "shard": shard_url, "exit_code": exit_code},
    )
    return Summary(exit_code, progress, shard_url)


def main() -> int:
    stop = threading.Event()

    def on_sigterm(signum: int, _frame: object) -> None:
        # Spot reclaim or job termination: finish what is in flight, flush, and let the retry resume.
        logger.warning("SIGTERM received: finishing the batch in flight, then exiting", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        config = WorkerConfig.from_env()
        return run(config, stop).exit_code
    except (ConfigError, ManifestError, LabelError, ModelLoadError) as exc:
        logger.error(str(exc))
        return EXIT_FAILED
