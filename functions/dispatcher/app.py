"""Dispatcher: one SQS batch of S3 upload notifications -> at most one Batch job.

Each notified object is inspected (its real type from its first bytes, its size), rejected with
a `document-rejected` record or claimed; the claimed objects of the whole batch go into one
manifest and one SubmitJob (an array job when the manifest has several shards). Messages that
could not be handled are returned as batch item failures, so SQS redelivers them and, after
maxReceiveCount, moves them to the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Literal
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.batch import AsyncBatchProcessor, EventType
from aws_lambda_powertools.utilities.parser.models import S3Model, S3RecordModel, SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, Json

from clip_shared import dispatch
from clip_shared.dispatch import Claim, ObjectRef, Rejection
from clip_shared.manifest import ManifestEntry


class Settings(BaseModel):
    """The function's configuration, read from its environment once per cold start."""

    model_config = ConfigDict(frozen=True)

    output_bucket: str = Field(alias="OUTPUT_BUCKET", min_length=3)
    output_prefix: str = Field(alias="OUTPUT_PREFIX", default="")
    job_queue: str = Field(alias="JOB_QUEUE", min_length=1)
    job_definition: str = Field(alias="JOB_DEFINITION", min_length=1)
    shard_size: int = Field(alias="SHARD_SIZE", default=1000, ge=1)
    max_object_bytes: int = Field(alias="MAX_OBJECT_BYTES", default=50 * 1024 * 1024, ge=1)


class S3TestEvent(BaseModel):
    """What S3 sends once when a notification configuration is saved; it names no object."""

    Event: Literal["s3:TestEvent"]
    Bucket: str


class S3NotificationRecord(SqsRecordModel):
    body: Json[S3Model | S3TestEvent]  # type: ignore[assignment]


class ObjectBusy(RuntimeError):
    """Another invocation holds a fresh claim on the object; SQS will redeliver the message."""


@dataclass(frozen=True)
class Claimed:
    message: S3NotificationRecord
    entries: tuple[ManifestEntry, ...]


@dataclass(frozen=True)
class Invocation:
    manifest_id: str
    started: datetime
    claim_ttl: timedelta


SETTINGS = Settings.model_validate(os.environ)
logger = Logger()
tracer = Tracer()
metrics = Metrics()
s3 = boto3.client("s3", config=dispatch.CLIENT_CONFIG)
batch = boto3.client("batch", config=dispatch.CLIENT_CONFIG)
processor = AsyncBatchProcessor(event_type=EventType.SQS, model=S3NotificationRecord)

# A claim outlives the invocation that made it by this much before another may take it over.
_CLAIM_MARGIN = timedelta(seconds=30)


def _object_ref(notified: S3RecordModel) -> ObjectRef:
    # Notification keys are URL-encoded with spaces as '+'.
    return ObjectRef(notified.s3.bucket.name, unquote_plus(notified.s3.object.key), notified.s3.object.versionId)


def _inspect_and_claim(ref: ObjectRef, invocation: Invocation) -> ManifestEntry | Rejection | Claim | None:
    outcome = dispatch.admit(s3, ref, SETTINGS.output_bucket, SETTINGS.output_prefix, SETTINGS.max_object_bytes,
                             invocation.manifest_id, invocation.started, invocation.claim_ttl)
    if outcome is Claim.BUSY:
        raise ObjectBusy(f"s3://{ref.bucket}/{ref.key} is being dispatched by another invocation")
    return outcome


async def handle_message(record: S3NotificationRecord, invocation: Invocation) -> Claimed:
    if isinstance(record.body, S3TestEvent):
        logger.info("Skipping s3:TestEvent", bucket=record.body.Bucket)
        return Claimed(record, ())
    entries: list[ManifestEntry] = []
    try:
        for notified in record.body.Records:
            ref = _object_ref(notified)
            outcome = await asyncio.to_thread(_inspect_and_claim, ref, invocation)
            if isinstance(outcome, ManifestEntry):
                entries.append(outcome)
            elif isinstance(outcome, Rejection):
                logger.info("Rejected object", bucket=ref.bucket, key=ref.key, reason=str(outcome.code),
                            detail=outcome.message)
                with single_metric(name="ObjectsRejected", unit=MetricUnit.Count, value=1) as metric:
                    metric.add_dimension(name="Reason", value=str(outcome.code))
            elif outcome is Claim.DONE:
                logger.info("Duplicate delivery; a job was already submitted", bucket=ref.bucket, key=ref.key)
                metrics.add_metric(name="DuplicateDeliveries", unit=MetricUnit.Count, value=1)
            else:
                logger.info("Superseded by a newer version", bucket=ref.bucket, key=ref.key)
    except Exception:
        # A message fails as a whole, so it must not keep claims on the objects it did get to.
        await asyncio.to_thread(dispatch.release, s3, SETTINGS.output_bucket, SETTINGS.output_prefix, entries)
        raise
    return Claimed(record, tuple(entries))


@tracer.capture_method
def submit_claimed(claimed: list[Claimed], manifest_id: str) -> None:
    entries = [entry for item in claimed for entry in item.entries]
    manifest = dispatch.new_manifest(entries, SETTINGS.shard_size, manifest_id)
    try:
        job = dispatch.submit(s3, batch, SETTINGS.output_bucket, SETTINGS.output_prefix, manifest,
                              SETTINGS.job_queue, SETTINGS.job_definition)
    except Exception:
        logger.exception("Submitting the manifest failed; its messages will be redelivered")
        failure = sys.exc_info()
        for item in claimed:
            processor.failure_handler(record=item.message, exception=failure)
        try:
            dispatch.release(s3, SETTINGS.output_bucket, SETTINGS.output_prefix, entries)
        except Exception:
            # The claims then expire and the redelivered messages take them over.
            logger.exception("Releasing claims failed")
        return
    logger.info("Submitted job", job_id=job.job_id, job_name=job.job_name, manifest_uri=job.manifest_uri,
                entries=len(entries), array_size=job.array_size)
    metrics.add_metric(name="ObjectsAccepted", unit=MetricUnit.Count, value=len(entries))
    metrics.add_metric(name="JobsSubmitted", unit=MetricUnit.Count, value=1)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    started = datetime.now(timezone.utc)
    invocation = Invocation(
        manifest_id=dispatch.new_manifest_id(started),
        started=started,
        claim_ttl=timedelta(milliseconds=context.get_remaining_time_in_millis()) + _CLAIM_MARGIN,
    )
    logger.append_keys(manifest_id=invocation.manifest_id)
    with processor(records=event["Records"], handler=partial(handle_message, invocation=invocation)):
        results = processor.async_process()
        claimed = [result for status, result, _ in results if status == "success" and result.entries]
        if claimed:
            submit_claimed(claimed, invocation.manifest_id)
    return processor.response()
