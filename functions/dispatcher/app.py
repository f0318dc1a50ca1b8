"""Dispatcher: one SQS batch of S3 upload notifications -> at most one Batch job, or Lambda lane requests.

Each notified object is admitted (its real type from its first bytes, its size: one ranged GET,
clip_dispatch.admission) or rejected with a `document-rejected` record; the accepted objects of the
whole batch go into one job (an array job when they fill several shards, clip_dispatch.submission),
or, when EMBED_LANE says so for a batch of its size, to the embedding function's queue in manifests
of at most LAMBDA_LANE_MAX_IMAGES (clip_shared.lane). A lane request the function could not finish
comes back on the lane's fallback queue, which this function also reads: its manifest becomes a
Batch job that resumes the lane's work.
Messages that could not be handled are returned as batch item failures, so SQS redelivers them and,
after maxReceiveCount, moves them to the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.batch import AsyncBatchProcessor, EventType
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.parser.models import S3Model, S3RecordModel, SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, Json, model_validator

from clip_dispatch.admission import ADMISSION_THREADS, ObjectRef, Verdict, admit, record_rejection
from clip_dispatch.submission import SubmittedJob, dedupe, new_manifest_id, send_to_lane, submit, submit_job
from clip_shared import defaults, keys
from clip_shared.aws import CLIENT_CONFIG
from clip_shared.lane import LAMBDA_LANE_MAX_IMAGES, LANE_ATTEMPTS, EmbedLane, LaneRequest, lane_for
from clip_shared.manifest import ManifestEntry


class Settings(BaseModel):
    """The function's configuration, read from its environment once per cold start."""

    model_config = ConfigDict(frozen=True)

    output_bucket: str = Field(alias="OUTPUT_BUCKET", min_length=3)
    output_prefix: str = Field(alias="OUTPUT_PREFIX", default="")
    job_queue: str = Field(alias="JOB_QUEUE", min_length=1)
    job_definition: str = Field(alias="JOB_DEFINITION", min_length=1)
    shard_size: int = Field(alias="SHARD_SIZE", default=defaults.SHARD_SIZE, ge=1)
    max_object_bytes: int = Field(alias="MAX_OBJECT_BYTES", default=defaults.MAX_OBJECT_BYTES, ge=1)
    embed_lane: EmbedLane = Field(alias="EMBED_LANE", default=EmbedLane.BATCH)
    lambda_lane_max_images: int = Field(alias="LAMBDA_LANE_MAX_IMAGES", default=LAMBDA_LANE_MAX_IMAGES, ge=1)
    #: The embedding function's queue; required unless EMBED_LANE is batch.
    embed_queue_url: str = Field(alias="EMBED_QUEUE_URL", default="")
    #: The most lane invocations at once: in auto, a lane queue holding this many waiting requests
    #: is full, and the batch goes to Batch.
    lambda_lane_concurrency: int = Field(alias="LAMBDA_LANE_CONCURRENCY", default=2, ge=1)
    #: Where the lane hands back what it tried and could not finish (its attempt counts in Batch);
    #: a lane request from anywhere else (the lane's own queue, after the lane was turned off) was never tried.
    lane_fallback_queue_arn: str = Field(alias="LANE_FALLBACK_QUEUE_ARN", default="")

    @model_validator(mode="after")
    def _lane_has_a_queue(self) -> Settings:
        if self.embed_lane is not EmbedLane.BATCH and not self.embed_queue_url:
            raise ValueError(f"EMBED_LANE={self.embed_lane} needs EMBED_QUEUE_URL (the embedding function's queue)")
        return self


class S3TestEvent(BaseModel):
    """What S3 sends once when a notification configuration is saved; it names no object."""

    Event: Literal["s3:TestEvent"]
    Bucket: str


class S3NotificationRecord(SqsRecordModel):
    #: An upload's notification, S3's test event, or a lane request handed back from the lane's fallback queue.
    body: Json[S3Model | S3TestEvent | LaneRequest]


SETTINGS = Settings.model_validate(os.environ)
logger = Logger()
tracer = Tracer()
metrics = Metrics()
s3 = boto3.client("s3", config=CLIENT_CONFIG)
batch_client = boto3.client("batch", config=CLIENT_CONFIG)
sqs = boto3.client("sqs", config=CLIENT_CONFIG)
processor = AsyncBatchProcessor(event_type=EventType.SQS, model=S3NotificationRecord)
admission_pool = ThreadPoolExecutor(ADMISSION_THREADS, thread_name_prefix="admit")


def _object_ref(notified: S3RecordModel) -> ObjectRef | None:
    """The object a record announces; None for a record that names none (S3 sends them for no upload)."""
    announced = notified.s3.object
    if announced is None:
        return None
    return ObjectRef(notified.s3.bucket.name, keys.notified_key(announced.key), announced.versionId)


def _admit(ref: ObjectRef, manifest_id: str) -> ManifestEntry | None:
    # Runs on admission_pool's threads; the messages of a batch are admitted concurrently.
    admission = admit(s3, ref, SETTINGS.max_object_bytes)
    if admission.verdict is Verdict.ACCEPTED:
        return admission.entry
    if admission.rejection is not None:
        record_rejection(s3, SETTINGS.output_bucket, SETTINGS.output_prefix, admission.rejection, manifest_id)
        logger.info(
            "Rejected object",
            bucket=ref.bucket,
            key=ref.key,
            reason=str(admission.rejection.code),
            detail=admission.rejection.message,
        )
        with single_metric(name="ObjectsRejected", unit=MetricUnit.Count, value=1) as metric:
            metric.add_dimension(name="Reason", value=str(admission.rejection.code))
    else:
        logger.info("Superseded by a newer version", bucket=ref.bucket, key=ref.key)
    return None


async def handle_message(record: S3NotificationRecord, manifest_id: str) -> tuple[S3NotificationRecord, list[ManifestEntry]]:
    if isinstance(record.body, S3TestEvent):
        logger.info("Skipping s3:TestEvent", bucket=record.body.Bucket)
        return record, []
    if isinstance(record.body, LaneRequest):
        tried = LANE_ATTEMPTS if record.eventSourceARN == SETTINGS.lane_fallback_queue_arn else 0
        await asyncio.get_running_loop().run_in_executor(admission_pool, hand_to_batch, record.body, tried)
        metrics.add_metric(name="LaneRequestsHandedToBatch", unit=MetricUnit.Count, value=1)
        return record, []
    entries = []
    for notified in record.body.Records:
        ref = _object_ref(notified)
        if ref is None:
            logger.info("Skipping a record that names no object", event_name=notified.eventName)
            continue
        entry = await asyncio.get_running_loop().run_in_executor(admission_pool, _admit, ref, manifest_id)
        if entry is not None:
            entries.append(entry)
    return record, entries


def lane_backlog() -> int:
    """Lane requests waiting for a function: one GetQueueAttributes a batch that may go to Lambda."""
    attributes = sqs.get_queue_attributes(QueueUrl=SETTINGS.embed_queue_url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessages"])


def hand_to_batch(request: LaneRequest, tried: int) -> None:
    """A lane request the embedding function could not finish (`tried` times) or never will: its
    manifest, as a Batch job resuming its work."""
    job = submit_job(
        batch_client,
        request.manifest_uri,
        request.manifest_id,
        1,
        SETTINGS.job_queue,
        SETTINGS.job_definition,
        earlier_attempts=tried,
    )
    logger.warning("Lane request handed to Batch", job_id=job.job_id, manifest_uri=request.manifest_uri, entries=request.images)


@tracer.capture_method
def submit_accepted(accepted: list[tuple[S3NotificationRecord, list[ManifestEntry]]], manifest_id: str) -> None:
    entries = dedupe([entry for _, message_entries in accepted for entry in message_entries])
    lane = lane_for(
        SETTINGS.embed_lane, len(entries), SETTINGS.lambda_lane_max_images, lane_backlog, SETTINGS.lambda_lane_concurrency
    )
    try:
        if lane is EmbedLane.LAMBDA:
            requests, unsent = send_to_lane(
                s3,
                sqs,
                SETTINGS.output_bucket,
                SETTINGS.output_prefix,
                manifest_id,
                entries,
                SETTINGS.lambda_lane_max_images,
                SETTINGS.embed_queue_url,
            )
            for request in unsent:
                # Its manifest is written: it goes to Batch now, rather than to the lane twice after a redelivery.
                hand_to_batch(request, 0)
        else:
            job = submit(
                s3,
                batch_client,
                SETTINGS.output_bucket,
                SETTINGS.output_prefix,
                manifest_id,
                entries,
                SETTINGS.shard_size,
                SETTINGS.job_queue,
                SETTINGS.job_definition,
            )
    except Exception:
        logger.exception("Handing the accepted objects on failed; their messages will be redelivered", lane=str(lane))
        failure = sys.exc_info()
        for message, _ in accepted:
            processor.failure_handler(record=message, exception=failure)
        return
    metrics.add_metric(name="ObjectsAccepted", unit=MetricUnit.Count, value=len(entries))
    if lane is EmbedLane.LAMBDA:
        logger.info("Sent to the Lambda lane", manifests=[request.manifest_uri for request in requests], entries=len(entries))
        metrics.add_metric(name="LaneRequestsSent", unit=MetricUnit.Count, value=len(requests) - len(unsent))
    else:
        log_submitted(job, len(entries))


def log_submitted(job: SubmittedJob, entries: int) -> None:
    logger.info(
        "Submitted job",
        job_id=job.job_id,
        job_name=job.job_name,
        manifest_uri=job.manifest_uri,
        entries=entries,
        array_size=job.array_size,
    )
    metrics.add_metric(name="JobsSubmitted", unit=MetricUnit.Count, value=1)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    manifest_id = new_manifest_id(datetime.now(UTC))
    logger.append_keys(manifest_id=manifest_id)
    with processor(records=event["Records"], handler=partial(handle_message, manifest_id=manifest_id)):
        results = processor.async_process()
        accepted = [result for status, result, _ in results if status == "success" and result[1]]
        if accepted:
            submit_accepted(accepted, manifest_id)
    return processor.response()
