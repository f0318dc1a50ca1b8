"""The first stage, on the prepare threads: each manifest entry -> finished already, failed, or the
model's input (or a JPEG left for the device to decode), read ahead of the model in a bounded window."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from clip_shared.events import DocumentError, ErrorCode
from clip_shared.manifest import ManifestEntry
from clip_worker import device_decode, pixels, reader
from clip_worker.config import WorkerConfig
from clip_worker.log import logger
from clip_worker.model import ClipModel
from clip_worker.progress import Progress
from clip_worker.sandbox import Sandbox

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Prepared:
    entry: ManifestEntry
    version: reader.ObjectVersion
    #: The model's input made on the CPU, or a JPEG left for the main thread to decode on the device.
    image: torch.Tensor | device_decode.Jpeg


@dataclass(frozen=True)
class Failed:
    entry: ManifestEntry
    error: DocumentError


@dataclass(frozen=True)
class Deferred:
    """Failed in a way a later try may not (throttling, S3's 5xx, the network): no record is written yet."""

    entry: ManifestEntry
    reason: str
    #: False when only another attempt can do better, not this one after a pause: an object over the
    #: Lambda lane's decoding budget, which the Batch job decodes under the worker's.
    retry_here: bool = True
    #: What it is recorded as should no attempt be left: download-failed, or the budget's refusal.
    code: ErrorCode = ErrorCode.DOWNLOAD_FAILED


def ahead(
    pool: ThreadPoolExecutor, items: Iterable[T], work: Callable[[T], R], window: int, stop: threading.Event
) -> Iterator[R]:
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


def model_input(data: bytes, url: str, stage: Stage) -> torch.Tensor | device_decode.Jpeg:
    """What the prepare threads make of an object's bytes, in the sandbox: a JPEG for the device
    when it can take it and there is room to hold its bytes (device_decode.HeldBytes), else the
    model's input from the CPU path."""
    model, max_pixels = stage.model, stage.config.max_image_pixels
    if not (stage.on_device and stage.held.take(len(data))):
        return model.prepare(data, url, max_pixels, stage.sandbox)
    preprocess = model.bounded_preprocess
    try:
        found = stage.sandbox.run(url, pixels.device_or_cpu_pixels, data, url, preprocess.step, model.image_size, max_pixels)
    except BaseException:
        stage.held.give(len(data))
        raise
    if isinstance(found, pixels.Header):
        return device_decode.Jpeg.of(data, found)
    stage.held.give(len(data))
    return preprocess.finish(found)


def unexpected(entry: ManifestEntry, exc: Exception) -> Failed:
    logger.exception("unexpected error preparing object", extra={"url": entry.url})
    return Failed(entry, DocumentError(ErrorCode.INTERNAL_ERROR, f"{entry.url}: {type(exc).__name__}: {exc}"))


@dataclass(frozen=True)
class Stage:
    """What preparing needs besides the entry: the same for every object of the job."""

    s3: Any
    model: ClipModel
    config: WorkerConfig
    on_device: bool
    progress: Progress
    #: Where every object is decoded, under its budget.
    sandbox: Sandbox
    #: Bytes of the JPEGs left for the device (on_device), until their batch is decoded.
    held: device_decode.HeldBytes


def prepare(entry: ManifestEntry, stage: Stage) -> Prepared | Failed | Deferred:
    try:
        with stage.progress.timed("download"):
            data, version = reader.fetch(entry, stage.s3, stage.config.max_object_bytes)
        with stage.progress.timed("decode"):
            return Prepared(entry, version, model_input(data, entry.url, stage))
    except DocumentError as error:
        if error.over in ("memory", "wall") and stage.config.defer_too_costly:
            # Out of the memory or the time this machine has, not of what any machine allows (its CPU
            # seconds, its structure): the Batch job, with more of both, may well decode it.
            return Deferred(entry, error.message, retry_here=False, code=error.code)
        return Failed(entry, error)
    except reader.TransientError as exc:
        return Deferred(entry, str(exc))
    except Exception as exc:  # noqa: BLE001 - one object's surprise must not stop the others
        return unexpected(entry, exc)
