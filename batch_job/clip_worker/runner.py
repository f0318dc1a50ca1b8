"""The job child: read its manifest, resume what earlier attempts finished, run the pipeline, write.

Stages: prepare.py (download, decode), embed.py (batches through the model), writer.py (outputs),
composed by pipeline.py; progress.py counts and times them; sandbox.py decodes every object in
helper processes under a budget of its own; journal.py lets the attempt after a crash find the
object that caused it. On a GPU with a hardware JPEG decoder the prepare threads only download and
check JPEGs, and the main thread decodes them a batch at a time on the GPU (see device_decode.py).

Nothing is lost to a bad moment of AWS's: an object S3 would not serve (throttling, 5xx, the
network) after the client's own retries is tried once more after a pause, then left, with no
record, to the job's next attempt (exit code EXIT_RETRY, which the job definition retries); only
the last attempt records it as `download-failed`. Nor to the job's timeout: a child that nears it
(JOB_TIMEOUT_SECONDS) starts nothing new, writes what it finished and leaves the rest to the next
attempt, or, on the last, records the rest as `timed-out`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_worker import device_decode, reader
from clip_worker.config import WorkerConfig
from clip_worker.embed import Embedder, device_transform
from clip_worker.journal import Journal
from clip_worker.labels import LabelSet, read_labels
from clip_worker.log import logger
from clip_worker.model import ClipModel, default_batch_size, load
from clip_worker.pipeline import Pipeline
from clip_worker.prepare import Deferred, Failed, Stage
from clip_worker.progress import Progress
from clip_worker.sandbox import Sandbox
from clip_worker.writer import OutputWriter, Resumed

EXIT_OK = 0
EXIT_FAILED = 1
#: EX_TEMPFAIL: work was left to the next attempt (S3 would not serve or store it); the job
#: definition's retry strategy retries this code, and the next attempt skips what is finished.
EXIT_RETRY = 75
#: 128 + SIGTERM, what a process stopped by SIGTERM conventionally reports.
EXIT_INTERRUPTED = 143
#: What a child keeps of its job's time to finish the work in flight and write its outputs: what
#: an object may take to decode (DECODE_WALL_SECONDS) plus two minutes, at most a quarter of it.
TIMEOUT_RESERVE_S = 120


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


def time_left(config: WorkerConfig, started: float, stop: threading.Event, timed_out: threading.Event) -> threading.Timer | None:
    """A timer that sets `timed_out` and `stop` when the child should stop to beat the job's timeout."""
    if config.job_timeout_s is None:
        return None
    reserve = min(config.decode_wall_s + TIMEOUT_RESERVE_S, config.job_timeout_s / 4)

    def expire() -> None:
        logger.warning(
            "the job's timeout is near: finishing the work in flight, then writing the outputs",
            extra={"job_timeout_s": config.job_timeout_s, "reserve_s": round(reserve)},
        )
        timed_out.set()
        stop.set()

    timer = threading.Timer(max(0.0, started + config.job_timeout_s - reserve - time.monotonic()), expire)
    timer.daemon = True
    timer.start()
    return timer


def new_sandbox(config: WorkerConfig) -> Sandbox:
    """The decoding processes of a child; they start at once, while the caller loads its model."""
    return Sandbox(config.decode_limits, config.decode_processes)


def run(
    config: WorkerConfig,
    stop: threading.Event | None = None,
    s3: Any = None,
    model: ClipModel | None = None,
    sandbox: Sandbox | None = None,
) -> Summary:
    """One job child. A caller that runs several in one process (the Lambda lane, warm) passes the
    model and the sandbox it keeps; otherwise the child loads its own and closes its sandbox."""
    started = time.monotonic()
    stop = stop or threading.Event()
    timed_out = threading.Event()
    timer = time_left(config, started, stop, timed_out)
    with contextlib.ExitStack() as owned:
        if sandbox is None:
            sandbox = owned.enter_context(new_sandbox(config))
        try:
            return _run(config, stop, s3 or s3_client(config), sandbox, timed_out, model)
        finally:
            if timer is not None:
                timer.cancel()


def _run(
    config: WorkerConfig, stop: threading.Event, s3: Any, sandbox: Sandbox, timed_out: threading.Event, model: ClipModel | None
) -> Summary:
    shard_index = config.array_index or 0
    manifest = reader.load_manifest(config.manifest_uri, shard_index, s3)
    entries = manifest.entries
    # Read before the weights load, so a bad label set fails the job at once.
    labels = read_labels(config.labels, s3) if config.labels else None
    model = model or load(config.model, config.pretrained, config.device, config.cache_dir, config.model_config_path)
    # The text tower runs once per job; each batch then costs one small matrix product.
    label_set = LabelSet.cached(model, labels, config.cache_dir) if labels else None
    batch_size = config.batch_size or default_batch_size(model.device)
    journal_key = keys.journal_key(config.output_prefix, manifest.manifest_id, shard_index)
    journal = Journal(s3, config.output_bucket, journal_key, config.attempt, 2 * batch_size + config.io_threads)
    recovery = journal.recover()
    # After a crash every image is prepared on the CPU: what killed the worker may be the device's decoder.
    transform = None if recovery.crashed else device_transform(model, config.gpu_decode)
    progress = Progress(total=len(entries), interval_s=config.progress_interval_s)
    held = device_decode.HeldBytes(config.device_jpeg_mb * 1024 * 1024)
    stage = Stage(s3, model, config, transform is not None, progress, sandbox, held)

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
        embedder = Embedder(model, config.max_image_pixels, transform, sandbox, held)
        pipeline = Pipeline(entries, stage, embedder, writer, journal, label_set, batch_size, stop)
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
        out_of_time = timed_out.is_set() and progress.done < progress.total
        if out_of_time:
            record_timed_out(pipeline, deferred, config)
        shard_url = final_checkpoint(pipeline)

    interrupted = stop.is_set() and progress.done < progress.total
    if out_of_time:
        # Every object has its outcome on the last attempt; before it, the next attempt does the rest.
        exit_code = EXIT_FAILED if config.attempt >= config.max_attempts else EXIT_RETRY
    elif interrupted:
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
    """The objects S3 failed to serve, tried once more after a pause; returns those still failing,
    and those only another attempt can take."""
    again = [item for item in deferred if item.retry_here]
    if not again or stop.is_set():
        return deferred
    logger.warning(
        "retrying objects S3 failed to serve",
        extra={"objects": len(again), "wait_s": config.transient_retry_s, "first": again[0].reason},
    )
    if stop.wait(config.transient_retry_s):
        return deferred
    left = [item for item in deferred if not item.retry_here]
    return left + pipeline.process(sorted(pipeline.position(item.entry) for item in again), pool)


def settle(pipeline: Pipeline, deferred: list[Deferred], config: WorkerConfig) -> None:
    """What is still failing is left to the next attempt, or recorded as download-failed on the last."""
    if config.attempt >= config.max_attempts:
        for item in deferred:
            if not item.retry_here:
                # Over the budget, and no attempt is left to afford it.
                pipeline.fail(Failed(item.entry, DocumentError(item.code, item.reason)))
                continue
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


def record_timed_out(pipeline: Pipeline, deferred: list[Deferred], config: WorkerConfig) -> None:
    """On the last attempt, what the job's timeout left undone is recorded as timed-out."""
    if config.attempt < config.max_attempts:
        return
    left = {item.entry for item in deferred}
    for entry in pipeline.entries:
        if entry not in left and not pipeline.writer.recorded(entry):
            pipeline.fail(
                Failed(
                    entry,
                    DocumentError(
                        ErrorCode.TIMED_OUT,
                        f"{entry.url} was not reached before the job's timeout (JobTimeoutSeconds, {config.job_timeout_s} s) "
                        f"on its last attempt ({config.attempt} of {config.max_attempts}); "
                        "`clip-pipeline retry --code timed-out` submits it again",
                    ),
                )
            )


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
