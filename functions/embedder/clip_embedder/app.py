"""Embedding function, the Lambda lane: one lane request (a manifest of one shard) -> what a job child writes.

The dispatcher sends a batch small enough for the lane (clip_shared.lane) to this function's queue
instead of submitting a Batch job. The request is run by the worker's own code (clip_worker.runner)
on Lambda's CPUs, with the same manifest, the same decoding budget per object and the same outputs
under the same keys, so the indexer, `status`, `retry` and every consumer see a job child's work.

Nothing is lost when the lane cannot finish:

- the worker leaves objects to a retry (S3 would not serve them, the invocation's time ran short,
  a write failed): the request goes to the lane's fallback queue at once;
- the invocation fails, times out or is killed: its message is not deleted and, after the queue's
  one receive (maxReceiveCount 1), SQS moves it to the same fallback queue.

The dispatcher reads that queue and submits the manifest to Batch as a job whose attempts count
this one (EARLIER_ATTEMPTS): it resumes what the lane finished, and an object that killed the
function is isolated there as any crash suspect is (clip_worker.journal). A poison image fails
alone here too: every decode runs in the sandbox's helper processes.

The model and the decoding processes are made at the first request and kept while the function is warm.
It runs in the query API's image (CPU torch, the baked weights), with its own handler.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, Json

from clip_shared.aws import CLIENT_CONFIG
from clip_shared.lane import LaneRequest
from clip_worker.config import WorkerConfig
from clip_worker.model import ClipModel, load
from clip_worker.runner import EXIT_OK, Summary, new_sandbox, run, s3_client
from clip_worker.sandbox import Sandbox


class Settings(BaseModel):
    """The function's own configuration; the worker's comes from the same environment (WorkerConfig)."""

    model_config = ConfigDict(frozen=True)

    #: Where a request the lane could not finish goes: the dispatcher hands it to Batch from there.
    fallback_queue_url: str = Field(alias="FALLBACK_QUEUE_URL", min_length=1)
    #: Kept of the invocation's time to write the outputs after the work stops (Lambda's own timeout
    #: is not the worker's: it kills the process without warning).
    reserve_s: int = Field(alias="LANE_RESERVE_SECONDS", default=30, ge=0)


class LaneRecord(SqsRecordModel):
    body: Json[LaneRequest]


SETTINGS = Settings.model_validate(os.environ)
logger = Logger()
tracer = Tracer()
metrics = Metrics()
sqs = boto3.client("sqs", config=CLIENT_CONFIG)
processor = BatchProcessor(event_type=EventType.SQS, model=LaneRecord)


class Warm:
    """What outlives an invocation while the function is warm: the S3 client, the model, the decoding processes."""

    def __init__(self) -> None:
        self.s3: Any = None
        self.model: ClipModel | None = None
        self.sandbox: Sandbox | None = None

    def ready(self, config: WorkerConfig) -> tuple[Any, ClipModel, Sandbox]:
        if self.sandbox is None:
            # Its processes import while the model loads.
            self.sandbox = new_sandbox(config)
            self.s3 = s3_client(config)
        if self.model is None:
            self.model = load(config.model, config.pretrained, config.device, config.cache_dir, config.model_config_path)
        return self.s3, self.model, self.sandbox


WARM = Warm()


def worker_config(request: LaneRequest, context: LambdaContext) -> WorkerConfig:
    """The worker's settings for this request: the function's environment, the request's manifest,
    and the invocation's remaining time as the job's timeout."""
    remaining_s = context.get_remaining_time_in_millis() // 1000
    return WorkerConfig.from_env(
        {
            **os.environ,
            "MANIFEST_URI": request.manifest_uri,
            "AWS_BATCH_JOB_ID": f"lambda-{context.aws_request_id}",
            "JOB_TIMEOUT_SECONDS": str(max(1, remaining_s - SETTINGS.reserve_s)),
            # An object over the lane's budget (DECODE_MEMORY_MB is smaller here) goes to Batch, not failed.
            "DEFER_TOO_COSTLY": "true",
        }
    )


def embed(record: LaneRecord, lambda_context: LambdaContext) -> None:
    request = record.body
    logger.append_keys(manifest_id=request.manifest_id)
    s3, model, sandbox = WARM.ready(worker_config(request, lambda_context))
    # Made after a cold start's model load, so that the worker's time is what is left of the invocation.
    config = worker_config(request, lambda_context)
    summary: Summary = run(config, threading.Event(), s3, model, sandbox)
    progress = summary.progress
    metrics.add_metric(name="LaneObjectsEmbedded", unit=MetricUnit.Count, value=progress.embedded)
    if summary.exit_code == EXIT_OK:
        logger.info("Lane request finished", images=request.images, shard=summary.shard_url, **progress.fields())
        return
    # What the worker left to a retry is Batch's now; what it finished stays, and is skipped there.
    sqs.send_message(QueueUrl=SETTINGS.fallback_queue_url, MessageBody=request.to_json())
    metrics.add_metric(name="LaneRequestsHandedToBatch", unit=MetricUnit.Count, value=1)
    logger.warning("Lane request handed to Batch", exit_code=summary.exit_code, **progress.fields())


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(event=event, record_handler=embed, processor=processor, context=context)
