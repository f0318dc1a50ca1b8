"""The job child: read its manifest, resume what earlier attempts finished, run the pipeline, write.

Stages: prepare.py (download, decode), embed.py (batches through the model), writer.py (outputs),
composed by pipeline.py; progress.py counts and times them; journal.py and isolation.py let the
attempt after a crash find the object that caused it. On a GPU with a hardware JPEG decoder the
prepare threads only download and check JPEGs, and the main thread decodes them a batch at a time
on the GPU (see device_decode.py).

Nothing is lost to a bad moment of AWS's: an object S3 would not serve (throttling, 5xx, the
network) after the client's own retries is tried once more after a pause, then left, with no
record, to the job's next attempt (exit code EXIT_RETRY, which the job definition retries); only
the last attempt records it as `download-failed`.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_worker import reader
from clip_worker.config import WorkerConfig
from clip_worker.decoder import PixelBudget
from clip_worker.embed import Embedder, device_transform
from clip_worker.isolation import Isolated
from clip_worker.journal import Journal
from clip_worker.labels import LabelSet, read_labels
from clip_worker.log import logger
from clip_worker.model import default_batch_size, load
from clip_worker.pipeline import Pipeline
from clip_worker.prepare import Deferred, Failed, Stage
from clip_worker.progress import Progress
from clip_worker.writer import OutputWriter, Resumed

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
    shard_index = config.array_index or 0
    manifest = reader.load_manifest(config.manifest_uri, shard_index, s3)
    entries = manifest.entries
    # Read before the weights load, so a bad label set fails the job at once.
    labels = read_labels(config.labels, s3) if config.labels else None
    model = load(config.model, config.pretrained, config.device, config.cache_dir, config.model_config_path)
    # The text tower runs once per job; each batch then costs one small matrix product.
    label_set = LabelSet.cached(model, labels, config.cache_dir) if labels else None
    batch_size = config.batch_size or default_batch_size(model.device)
    journal_key = keys.journal_key(config.output_prefix, manifest.manifest_id, shard_index)
    journal = Journal(s3, config.output_bucket, journal_key, config.attempt, 2 * batch_size + config.io_threads)
    recovery = journal.recover()
    # After a crash every image is prepared in a helper process, on the CPU (see isolation.py).
    transform = None if recovery.crashed else device_transform(model, config.gpu_decode)
    progress = Progress(total=len(entries), interval_s=config.progress_interval_s)
    isolated = Isolated(model.bounded_preprocess, model.image_size, config.max_image_pixels) if recovery.crashed else None
    stage = Stage(s3, model, config, transform is not None, progress, PixelBudget(config.decode_pixel_budget), isolated)

    with (
        ThreadPoolExecutor(config.io_threads, "prepare") as prepare_pool,
        ThreadPoolExecutor(config.io_threads, "write") as write_pool,
    ):
        writer = OutputWriter(
            s3,
            config.output_bucket,
            config.output_prefix,
            model,
            config.job_id,
            manifest.manifest_id,
            shard_index,
            write_pool if config.per_object_outputs else None,
        )
        # A first attempt has nothing to resume (and saves the GET of a batch that does not exist).
        resumed = writer.resume(entries) if config.attempt > 1 else Resumed()
        pipeline = Pipeline(
            entries, stage, Embedder(model, config.max_image_pixels, transform), writer, journal, label_set, batch_size, stop
        )
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
                "decode_on_device": transform is not None,
                "labels": len(label_set.labels) if label_set else None,
                "finished_before": len(resumed.rows) + len(resumed.failed),
                "after_crash": recovery.crashed,
                "suspects": len(recovery.suspects),
            },
        )
        try:
            finished = {index for index, entry in enumerate(entries) if entry in resumed}
            progress.skipped = len(finished)
            culprit = recovery.culprit if recovery.culprit is not None and recovery.culprit < len(entries) else None
            if culprit is not None and culprit not in finished:
                pipeline.fail(
                    Failed(
                        entries[culprit],
                        DocumentError(
                            ErrorCode.CRASHES_WORKER,
                            f"{entries[culprit].url} was the only object in flight when attempt {recovery.attempt} of this job died "
                            "(a crash or an out-of-memory kill); it is not tried again",
                        ),
                    )
                )
                finished.add(culprit)
            suspects = sorted(index for index in recovery.suspects if index < len(entries) and index not in finished)
            journal.start(suspects)
            deferred = pipeline.careful(suspects) if suspects else []
            skip = finished | set(suspects)
            deferred += pipeline.process([index for index in range(len(entries)) if index not in skip], prepare_pool)
            deferred = retry_transient(pipeline, deferred, prepare_pool, config, stop)
            settle(pipeline, deferred, config)
            shard_url = final_checkpoint(pipeline)
        finally:
            if isolated is not None:
                isolated.close()

    interrupted = stop.is_set() and progress.done < progress.total
    if interrupted:
        exit_code = EXIT_INTERRUPTED
    elif progress.write_errors or progress.deferred:
        exit_code = EXIT_RETRY
    else:
        exit_code = EXIT_OK
    if exit_code != EXIT_OK:
        try:
            journal.exited()
        except Exception as exc:  # noqa: BLE001 - the next attempt then suspects the last window: slower, not wrong
            logger.warning("could not update the journal", extra={"reason": str(exc)})
    logger.info(
        "job interrupted" if interrupted else "job finished",
        extra={**progress.fields(), "shard": shard_url, "exit_code": exit_code},
    )
    return Summary(exit_code, progress, shard_url)


def retry_transient(
    pipeline: Pipeline, deferred: list[Deferred], pool: ThreadPoolExecutor, config: WorkerConfig, stop: threading.Event
) -> list[Deferred]:
    """The objects S3 failed to serve, tried once more after a pause; returns those still failing."""
    if not deferred or stop.is_set():
        return deferred
    logger.warning(
        "retrying objects S3 failed to serve",
        extra={"objects": len(deferred), "wait_s": config.transient_retry_s, "first": deferred[0].reason},
    )
    if stop.wait(config.transient_retry_s):
        return deferred
    return pipeline.process(sorted(pipeline.position(item.entry) for item in deferred), pool)


def settle(pipeline: Pipeline, deferred: list[Deferred], config: WorkerConfig) -> None:
    """What is still failing is left to the next attempt, or recorded as download-failed on the last."""
    if config.attempt >= config.max_attempts:
        for item in deferred:
            pipeline.fail(
                Failed(
                    item.entry,
                    DocumentError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"{item.reason} (still failing on attempt {config.attempt} of {config.max_attempts}; "
                        "`clip-pipeline retry --code download-failed` tries again)",
                    ),
                )
            )
        return
    for item in deferred:
        logger.warning("object left to the next attempt", extra={"url": item.entry.url, "reason": item.reason})
    pipeline.progress.deferred = len(deferred)


def final_checkpoint(pipeline: Pipeline) -> str | None:
    """The child's last shard and events batch; a failed write ends the attempt for a retry."""
    for entry, exc in pipeline.writer.flush():
        pipeline.progress.write_errors += 1
        logger.error("could not write outputs", extra={"url": entry.url, "reason": str(exc)})
    try:
        return pipeline.checkpoint()
    except Exception as exc:  # noqa: BLE001 - the next attempt writes it again from what it redoes
        pipeline.progress.write_errors += 1
        logger.error("could not write the shard and events batch", extra={"reason": f"{type(exc).__name__}: {exc}"})
        return None
