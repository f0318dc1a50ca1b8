"""The job: read this child's shard, prepare ahead of the model, embed in batches, write.

Threads download and decode (boto3 and Pillow release the GIL) while the main thread runs the
model, and another set of threads uploads results, so the accelerator never waits on one image.
On a GPU the threads only download and check JPEGs; the main thread decodes them a batch at a
time on the GPU when it has a hardware JPEG decoder (see device_decode.py).

Stages: prepare.py (download, decode), embed.py (batches through the model), writer.py (outputs);
progress.py counts and times them; journal.py and isolation.py let the attempt after a crash find
the object that caused it.

Nothing is lost to a bad moment of AWS's: an object S3 would not serve (throttling, 5xx, the
network) after the client's own retries is tried once more after a pause, then left, with no
record, to the job's next attempt (exit code EXIT_RETRY, which the job definition retries); only
the last attempt records it as `download-failed`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
import numpy as np
from botocore.config import Config

from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_shared.manifest import ManifestEntry
from clip_worker import reader
from clip_worker.config import WorkerConfig
from clip_worker.decoder import PixelBudget
from clip_worker.embed import Embedder, device_transform, keywords
from clip_worker.isolation import Isolated
from clip_worker.journal import Journal
from clip_worker.labels import LabelSet, read_labels
from clip_worker.log import logger
from clip_worker.model import default_batch_size, load
from clip_worker.prepare import Deferred, Failed, Finished, Prepared, Stage, ahead, prepare
from clip_worker.progress import Progress
from clip_worker.writer import OutputWriter, Row

EXIT_OK = 0
EXIT_FAILED = 1
#: EX_TEMPFAIL: work was left to the next attempt (S3 would not serve or store it); the job
#: definition's retry strategy retries this code, and the next attempt skips what is finished.
EXIT_RETRY = 75
#: 128 + SIGTERM, what a process stopped by SIGTERM conventionally reports.
EXIT_INTERRUPTED = 143


@dataclass(frozen=True)
class Summary:
    exit_code: int
    progress: Progress
    shard_url: str | None


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
    shard_index = config.array_index or 0
    # Read before the weights load, so a bad label set fails the job at once.
    labels = read_labels(config.labels, s3) if config.labels else None
    model = load(config.model, config.pretrained, config.device, config.cache_dir, config.model_config_path)
    # The text tower runs once per job; each batch then costs one small matrix product.
    label_set = LabelSet.cached(model, labels, config.cache_dir) if labels else None
    writer = OutputWriter(s3, config.output_bucket, config.output_prefix, model, config.job_id or manifest.manifest_id)
    batch_size = config.batch_size or default_batch_size(model.device)
    transform = device_transform(model, config.gpu_decode)
    window = 2 * batch_size + config.io_threads
    journal = Journal(s3, config.output_bucket, keys.journal_key(config.output_prefix, manifest.manifest_id, shard_index), config.attempt, window)
    recovery = journal.recover()
    last_attempt = config.attempt >= config.max_attempts
    logger.info(
        "job started",
        extra={
            "manifest": config.manifest_uri,
            "array_index": config.array_index,
            "entries": len(entries),
            "attempt": config.attempt,
            "max_attempts": config.max_attempts,
            "model": model.name,
            "pretrained": model.pretrained,
            "device": str(model.device),
            "batch_size": batch_size,
            "decode_on_device": transform is not None and not recovery.crashed,
            "labels": len(label_set.labels) if label_set else None,
            "after_crash": recovery.crashed,
            "suspects": len(recovery.suspects),
        },
    )
    progress = Progress(total=len(entries), interval_s=config.progress_interval_s)
    isolated = Isolated(model.bounded_preprocess, model.image_size, config.max_image_pixels) if recovery.crashed else None
    stage = Stage(s3, writer, model, config, transform is not None, progress, PixelBudget(config.decode_pixel_budget), isolated)
    rows: list[Row] = []
    writes: list[tuple[ManifestEntry, Future[None]]] = []
    position = {entry: index for index, entry in reversed(list(enumerate(entries)))}
    in_flight: Counter[ManifestEntry] = Counter()

    try:
        with ThreadPoolExecutor(config.io_threads, "prepare") as prepare_pool, ThreadPoolExecutor(
            config.io_threads, "write"
        ) as write_pool:

            def write(entry: ManifestEntry, call: Any, *args: Any) -> None:
                def timed() -> None:
                    with progress.timed("write"):
                        call(*args)

                writes.append((entry, write_pool.submit(timed)))

            def landed(entry: ManifestEntry) -> None:
                in_flight[entry] -= 1
                if in_flight[entry] <= 0:
                    del in_flight[entry]

            def fail(result: Failed) -> None:
                logger.warning("object failed", extra={"url": result.entry.url, "code": result.error.code, "reason": result.error.message})
                write(result.entry, writer.failed, result.entry, result.error)
                progress.failed += 1
                landed(result.entry)

            def embedded(done: list[tuple[Prepared, np.ndarray]]) -> None:
                vectors = [vector for _, vector in done]
                for (item, vector), words in zip(done, keywords(label_set, vectors, config.keywords_top_k)):
                    rows.append(Row(item.entry, item.etag, vector))
                    write(item.entry, writer.created, item.entry, item.etag, vector, words)
                    landed(item.entry)
                progress.embedded += len(done)

            def embed(batch: list[Prepared], flush: bool = False) -> None:
                with progress.timed("embed"):
                    failures, done = embedder.submit(batch)
                    if flush:
                        done += embedder.finish()
                for failure in failures:
                    fail(failure)
                embedded(done)

            def handle(result: Prepared | Finished | Failed | Deferred, batch: list[Prepared], deferred: list[Deferred]) -> None:
                if isinstance(result, Finished):
                    rows.append(Row(result.entry, result.entry.etag, result.vector))
                    progress.skipped += 1
                    landed(result.entry)
                elif isinstance(result, Failed):
                    fail(result)
                elif isinstance(result, Deferred):
                    deferred.append(result)
                    landed(result.entry)
                else:
                    batch.append(result)

            def submitted(order: list[int]) -> Iterator[ManifestEntry]:
                for index in order:
                    journal.advance(index, lambda: min((position[entry] for entry in in_flight), default=index))
                    in_flight[entries[index]] += 1
                    yield entries[index]

            def process(order: list[int]) -> list[Deferred]:
                """Prepare, embed and write the entries at `order`; returns those S3 failed transiently."""
                batch: list[Prepared] = []
                deferred: list[Deferred] = []
                for result in ahead(prepare_pool, submitted(order), lambda entry: prepare(entry, stage), window, stop):
                    handle(result, batch, deferred)
                    if len(batch) >= batch_size:
                        embed(batch)
                        batch = []
                    progress.tick()
                embed(batch, flush=True)
                return deferred

            def careful(suspects: list[int]) -> list[Deferred]:
                """Each suspect alone, named in the journal first: if it kills this attempt, the next one knows."""
                deferred: list[Deferred] = []
                for index in suspects:
                    if stop.is_set():
                        break
                    journal.careful(index)
                    in_flight[entries[index]] += 1
                    batch: list[Prepared] = []
                    handle(prepare(entries[index], stage), batch, deferred)
                    embed(batch, flush=True)
                    progress.tick()
                journal.careful(None)
                return deferred

            embedder = Embedder(model, config.max_image_pixels, None if recovery.crashed else transform)
            culprit = recovery.culprit if recovery.culprit is not None and recovery.culprit < len(entries) else None
            if culprit is not None:
                in_flight[entries[culprit]] += 1
                fail(Failed(entries[culprit], DocumentError(
                    ErrorCode.CRASHES_WORKER,
                    f"{entries[culprit].url} was the only object in flight when attempt {recovery.attempt} of this job died "
                    "(a crash or an out-of-memory kill); it is not tried again",
                )))
            suspects = sorted(index for index in recovery.suspects if index < len(entries))
            journal.start(suspects)
            deferred = careful(suspects) if suspects else []
            skip = {*suspects, culprit}
            deferred += process([index for index in range(len(entries)) if index not in skip])
            if deferred and not stop.is_set():
                logger.warning(
                    "retrying objects S3 failed to serve",
                    extra={"objects": len(deferred), "wait_s": config.transient_retry_s, "first": deferred[0].reason},
                )
                stop.wait(config.transient_retry_s)
                deferred = process([position[item.entry] for item in deferred]) if not stop.is_set() else deferred
            for item in deferred:
                if last_attempt:
                    in_flight[item.entry] += 1
                    fail(Failed(item.entry, DocumentError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"{item.reason} (still failing on attempt {config.attempt} of {config.max_attempts}; "
                        "`clip-pipeline retry --code download-failed` tries again)",
                    )))
                else:
                    logger.warning("object left to the next attempt", extra={"url": item.entry.url, "reason": item.reason})
            progress.deferred = 0 if last_attempt else len(deferred)

            for entry, future in writes:
                if (exc := future.exception()) is not None:
                    progress.write_errors += 1
                    logger.error("could not write outputs", extra={"url": entry.url, "reason": str(exc)})

        order = {entry.url: index for index, entry in enumerate(entries)}
        rows.sort(key=lambda row: order[row.entry.url])
        try:
            with progress.timed("write"):
                shard_url: str | None = writer.shard(manifest.manifest_id, shard_index, rows)
        except Exception as exc:  # noqa: BLE001 - the next attempt rewrites the shard from what is finished
            logger.error("could not write the Parquet shard", extra={"reason": f"{type(exc).__name__}: {exc}"})
            progress.write_errors += 1
            shard_url = None
    finally:
        if isolated is not None:
            isolated.close()
        try:
            journal.exited()
        except Exception as exc:  # noqa: BLE001 - a stale "running" journal costs the next attempt time, not results
            logger.warning("could not update the journal", extra={"reason": str(exc)})

    interrupted = stop.is_set() and progress.done < progress.total
    if interrupted:
        exit_code = EXIT_INTERRUPTED
    elif progress.write_errors or progress.deferred:
        exit_code = EXIT_RETRY
    else:
        exit_code = EXIT_OK
    logger.info(
        "job interrupted" if interrupted else "job finished",
        extra={**progress.fields(), "shard": shard_url, "exit_code": exit_code},
    )
    return Summary(exit_code, progress, shard_url)
