"""Indexer: finished shards and removed uploads -> the vector store, as its one writer.

Each SQS batch holds S3 notifications of two kinds: a worker's Parquet shard created in the output
bucket, and an upload removed from the input bucket. The batch's shards go into their model's
store (clip_store) in one commit, oldest first; removals leave every model's store; then each
store touched has its index maintained (built, updated or retrained when due). Every step is
idempotent: a shard ingested twice adds nothing, a removal twice removes nothing, so a batch that
fails is simply redelivered by SQS and, after maxReceiveCount, parked in the dead-letter queue.

It runs in the query API's image (lancedb and pyarrow are too big for a zip), with its own handler.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.parser.models import S3Model, SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, Json

from clip_shared import keys
from clip_shared.aws import CLIENT_CONFIG
from clip_store import IndexPolicy, StoreError, VectorStore, current_etag, ingest_shards, maintain, store_uri, stored_models


class Settings(BaseModel):
    """The function's configuration, read from its environment once per cold start."""

    model_config = ConfigDict(frozen=True)

    output_bucket: str = Field(alias="OUTPUT_BUCKET", min_length=3)
    output_prefix: str = Field(alias="OUTPUT_PREFIX", default="")
    #: The largest table whose index this function trains within its 15 minutes (docs/search.md);
    #: past it the (re)training is left to `clip-pipeline index`, and the index keeps serving.
    index_max_train_rows: int = Field(alias="INDEX_MAX_TRAIN_ROWS", ge=IndexPolicy().exact_below)


class S3TestEvent(BaseModel):
    """What S3 sends once when a notification configuration is saved; it names no object."""

    Event: Literal["s3:TestEvent"]
    Bucket: str


class S3NotificationRecord(SqsRecordModel):
    body: Json[S3Model | S3TestEvent]


@dataclass
class Work:
    """What one batch asks for: shards by model, and the urls of removed uploads."""

    shards: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    removed: set[str] = field(default_factory=set)
    #: The batch's messages, to report every one failed when the batch's commit fails.
    messages: list[S3NotificationRecord] = field(default_factory=list)
    #: The message that announced each shard, to fail that message alone when its shard is unreadable.
    announced_by: dict[str, S3NotificationRecord] = field(default_factory=dict)


SETTINGS = Settings.model_validate(os.environ)
POLICY = IndexPolicy(max_train_rows=SETTINGS.index_max_train_rows)
logger = Logger()
tracer = Tracer()
metrics = Metrics()
s3 = boto3.client("s3", config=CLIENT_CONFIG)
processor = BatchProcessor(event_type=EventType.SQS, model=S3NotificationRecord)
# One store object per model for the life of the container: it keeps its open table and caches.
_stores: dict[str, VectorStore] = {}


def store(model_id: str) -> VectorStore:
    if model_id not in _stores:
        _stores[model_id] = VectorStore(store_uri(SETTINGS.output_bucket, SETTINGS.output_prefix, model_id))
    return _stores[model_id]


def collect(record: S3NotificationRecord, work: Work) -> None:
    """Sorts a message's records into the batch's work; nothing is written yet."""
    work.messages.append(record)
    if isinstance(record.body, S3TestEvent):
        return
    for notified in record.body.Records:
        announced = notified.s3.object
        if announced is None:
            continue
        bucket, key = notified.s3.bucket.name, unquote_plus(announced.key)
        if notified.eventName.startswith("ObjectRemoved"):
            work.removed.add(keys.s3_url(bucket, key))
        elif bucket == SETTINGS.output_bucket and (model_id := keys.model_of_shard(SETTINGS.output_prefix, key)):
            work.shards[model_id].append(keys.s3_url(bucket, key))
            work.announced_by[keys.s3_url(bucket, key)] = record


@tracer.capture_method
def apply(work: Work) -> dict[str, StoreError]:
    """Does the batch's work; returns the shards that could not be read (their messages fail alone)."""
    unreadable: dict[str, StoreError] = {}
    for model_id, shard_urls in work.shards.items():
        ingested = ingest_shards(store(model_id), s3, sorted(set(shard_urls)), unreadable=unreadable)
        logger.info("Ingested shards", model_id=model_id, shards=len(shard_urls), **asdict(ingested))
        metrics.add_metric(name="RowsIngested", unit=MetricUnit.Count, value=ingested.inserted + ingested.updated)
    removed = sorted(url for url in work.removed if current_etag(s3, url) is None)
    removed_from = stored_models(s3, SETTINGS.output_bucket, SETTINGS.output_prefix) if removed else []
    for model_id in removed_from:
        deleted = store(model_id).delete(removed)
        logger.info("Removed deleted uploads", model_id=model_id, urls=len(removed), rows=deleted)
        metrics.add_metric(name="RowsDeleted", unit=MetricUnit.Count, value=deleted)
    for model_id in {*work.shards, *removed_from}:
        done = maintain(store(model_id), POLICY)
        logger.info("Maintained the index", model_id=model_id, action=str(done.action), seconds=round(done.seconds, 2))
        if done.deferred is not None:
            logger.warning(
                "The index is due to be trained on more rows than this function trains within its time: run "
                "`clip-pipeline index` (docs/search.md); meanwhile new rows still go into the existing index",
                model_id=model_id,
                due=str(done.deferred),
                rows=done.state.rows,
                trained_rows=done.state.trained_rows,
                max_train_rows=POLICY.max_train_rows,
            )
            metrics.add_metric(name="IndexTrainingDeferred", unit=MetricUnit.Count, value=1)
    return unreadable


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    work = Work()
    with processor(records=event["Records"], handler=lambda record: collect(record, work)):
        processor.process()
        try:
            unreadable = apply(work)
        except Exception:
            # The whole batch is one commit: SQS redelivers it all, and every step is idempotent.
            logger.exception("Indexing the batch failed; its messages will be redelivered")
            failure = sys.exc_info()
            for message in work.messages:
                processor.failure_handler(record=message, exception=failure)
        else:
            for url, error in unreadable.items():
                logger.error(
                    "A shard could not be read; its message will be redelivered",
                    shard=url,
                    code=str(error.code),
                    reason=error.message,
                )
                processor.failure_handler(record=work.announced_by[url], exception=(type(error), error, error.__traceback__))
    return processor.response()
