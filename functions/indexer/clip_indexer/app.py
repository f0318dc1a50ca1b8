"""Indexer: finished shards and changes S3 made to uploads -> the vector store, as its writer.

Each SQS batch holds S3 notifications of three kinds:

- a worker's Parquet shard created in the output bucket: its rows go into its model's store, and
  the objects its child could not embed (named in its metadata) are reconciled;
- an upload removed from the input bucket (a delete, a delete marker, the removal of a version,
  a lifecycle expiration): reconciled;
- a dispatcher rejection written to the output bucket (the upload's newest version will never be
  embedded): reconciled.

Reconciling asks S3 what is current (one HEAD an object) and leaves each store holding at most
that version's row, with a tombstone (clip_store.reconcile) that a late shard cannot get past;
an object whose removal uncovered a version no store holds is sent to the dispatcher's queue to be
embedded again. Then each store touched has its index kept up.

Every step is idempotent, and a failure fails only the messages it concerns: a shard that cannot
be read, or a model's commit, fails the messages of that shard or that model; an object S3 would
not answer for fails the messages about it. SQS redelivers them and, after maxReceiveCount, parks
them in the dead-letter queue. Upkeep of the index never fails a batch whose work is committed.

It runs in the query API's image (lancedb and pyarrow are too big for a zip), with its own handler.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, Json

from clip_indexer.train import text_probes
from clip_shared import aws, keys, notifications
from clip_shared.aws import CLIENT_CONFIG
from clip_shared.events import document_url, from_json
from clip_store import (
    Database,
    IndexPolicy,
    Maintenance,
    S3Lease,
    Tombstones,
    VectorStore,
    ingest_shards,
    maintain,
    reconcile,
    store_uri,
    stored_models,
    tombstones_uri,
)
from clip_store.recall import Tuning
from clip_store.trainer import TrainingJobs, submit_training


class Settings(BaseModel):
    """The function's configuration, read from its environment once per cold start."""

    model_config = ConfigDict(frozen=True)

    output_bucket: str = Field(alias="OUTPUT_BUCKET", min_length=3)
    output_prefix: str = Field(alias="OUTPUT_PREFIX", default="")
    #: The largest table whose index this function trains within its 15 minutes (docs/search.md);
    #: past it the (re)training is submitted as an AWS Batch job, and the index keeps serving.
    index_max_train_rows: int = Field(alias="INDEX_MAX_TRAIN_ROWS", ge=IndexPolicy().exact_below)
    #: Where that job runs: the stack's job queue and its index job definition (clip_store.trainer).
    index_job_queue: str = Field(alias="INDEX_JOB_QUEUE", min_length=1)
    index_job_definition: str = Field(alias="INDEX_JOB_DEFINITION", min_length=1)
    #: The dispatcher's queue: an object whose removal uncovered a version no store holds goes there.
    upload_queue_url: str = Field(alias="UPLOAD_QUEUE_URL", min_length=1)


class S3TestEvent(BaseModel):
    """What S3 sends once when a notification configuration is saved; it names no object."""

    Event: Literal["s3:TestEvent"]
    Bucket: str


class NotifiedObject(BaseModel):
    key: str
    size: float | None = None


class NotifiedBucket(BaseModel):
    name: str


class NotifiedS3(BaseModel):
    bucket: NotifiedBucket
    announced: NotifiedObject | None = Field(default=None, alias="object")


class Notified(BaseModel):
    eventName: str
    s3: NotifiedS3


class S3Notification(BaseModel):
    """Only what the indexer reads of an S3 notification: Powertools' S3Model also checks fields the
    indexer never uses (an IP address in `sourceIPAddress`), which S3's own lifecycle events need not
    satisfy, and a notification refused here would be retried into the dead-letter queue."""

    Records: list[Notified]


class S3NotificationRecord(SqsRecordModel):
    body: Json[S3Notification | S3TestEvent]


@dataclass
class Work:
    """What one batch asks for, and which messages asked for each part, to fail those alone."""

    #: model id -> shard url -> the messages that announced it
    shards: dict[str, dict[str, list[S3NotificationRecord]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    #: object url -> the messages that asked for it to be reconciled
    checks: dict[str, list[S3NotificationRecord]] = field(default_factory=lambda: defaultdict(list))
    #: The urls of removals: only a removal can uncover a version to embed again.
    removed: set[str] = field(default_factory=set)
    failures: dict[str, tuple[S3NotificationRecord, BaseException]] = field(default_factory=dict)

    def fail(self, messages: list[S3NotificationRecord], error: BaseException) -> None:
        for message in messages:
            self.failures.setdefault(message.messageId, (message, error))


SETTINGS = Settings.model_validate(os.environ)
POLICY = IndexPolicy(max_train_rows=SETTINGS.index_max_train_rows)
logger = Logger()
tracer = Tracer()
metrics = Metrics()
s3 = boto3.client("s3", config=CLIENT_CONFIG)
sqs = boto3.client("sqs", config=CLIENT_CONFIG)
batch = boto3.client("batch", config=CLIENT_CONFIG)
JOBS = TrainingJobs(SETTINGS.index_job_queue, SETTINGS.index_job_definition)
processor = BatchProcessor(event_type=EventType.SQS, model=S3NotificationRecord)
# One for every model's store: a removal holds for a model whose store does not exist yet.
TOMBSTONES = Tombstones(Database(tombstones_uri(SETTINGS.output_bucket, SETTINGS.output_prefix)))
# One store object per model for the life of the container: it keeps its open table and caches.
_stores: dict[str, VectorStore] = {}
REMOVALS = ("ObjectRemoved", "LifecycleExpiration")


def store(model_id: str) -> VectorStore:
    if model_id not in _stores:
        uri = store_uri(SETTINGS.output_bucket, SETTINGS.output_prefix, model_id)
        _stores[model_id] = VectorStore(uri, tombstones=TOMBSTONES)
    return _stores[model_id]


def collect(record: S3NotificationRecord, work: Work) -> None:
    """Sorts a message's records into the batch's work; only a rejection's record is read here."""
    if isinstance(record.body, S3TestEvent):
        return
    for notified in record.body.Records:
        announced = notified.s3.announced
        if announced is None:
            continue
        bucket, key = notified.s3.bucket.name, keys.notified_key(announced.key)
        if notified.eventName.startswith(REMOVALS):
            work.checks[keys.s3_url(bucket, key)].append(record)
            work.removed.add(keys.s3_url(bucket, key))
        elif bucket != SETTINGS.output_bucket:
            continue
        elif model_id := keys.model_of_shard(SETTINGS.output_prefix, key):
            work.shards[model_id][keys.s3_url(bucket, key)].append(record)
        elif key.startswith(keys.rejected_prefix(SETTINGS.output_prefix)):
            url = rejected_url(bucket, key, announced.size)
            if url is None:
                # Not a rejection record (a console "folder", a file a person put there): nothing to do.
                logger.warning("Skipping an object under rejected/ that is not a rejection record", key=key)
                continue
            work.checks[url].append(record)


#: A dispatcher's rejection record is a few hundred bytes; anything much bigger is not one.
MAX_REJECTION_BYTES = 1 << 20


def rejected_url(bucket: str, key: str, size: float | None) -> str | None:
    """The url a rejection record names, or None for an object that is not one (read only if small)."""
    if size is None or size > MAX_REJECTION_BYTES:
        return None
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return document_url(from_json(body))
    except Exception:  # noqa: BLE001 - whatever is not one of our CloudEvents (JSON, shape, fields) is skipped alike
        return None


@tracer.capture_method
def ingest(work: Work) -> None:
    """Each model's shards in one commit; the objects their children could not embed join the checks."""
    for model_id, announced in work.shards.items():
        try:
            done = ingest_shards(store(model_id), s3, sorted(announced))
        except Exception as exc:  # noqa: BLE001 - one model's failure fails that model's messages alone
            logger.exception("Ingesting a model's shards failed; their messages will be redelivered", model_id=model_id)
            work.fail([message for messages in announced.values() for message in messages], exc)
            continue
        for url, error in done.refused.items():
            logger.error(
                "A shard was left out; its message will be redelivered", shard=url, code=str(error.code), reason=error.message
            )
            work.fail(announced[url], error)
        for shard_url, failed in done.failed.items():
            for url in failed:
                work.checks[url].extend(announced[shard_url])
        logger.info("Ingested shards", model_id=model_id, shards=len(announced) - len(done.refused), **asdict(done.ingested))
        metrics.add_metric(name="RowsIngested", unit=MetricUnit.Count, value=done.ingested.inserted + done.ingested.updated)


@tracer.capture_method
def check(work: Work) -> list[str]:
    """Reconciles every store with S3 about the objects the batch says changed; returns the models touched."""
    if not work.checks:
        return []
    try:
        models = stored_models(s3, SETTINGS.output_bucket, SETTINGS.output_prefix)
        done = reconcile(s3, [store(model_id) for model_id in models], TOMBSTONES, list(work.checks))
    except Exception as exc:  # noqa: BLE001 - the checks fail their own messages, not the shards'
        logger.exception("Reconciling removed or unembeddable objects failed; their messages will be redelivered")
        work.fail([message for messages in work.checks.values() for message in messages], exc)
        return []
    for url, error in done.unchecked.items():
        logger.error("S3 would not say whether an object changed; its messages will be redelivered", url=url, reason=str(error))
        work.fail(work.checks[url], error)
    # A rejection or a failure never sends its own object back (it would loop), unless the object
    # changed while it was reconciled: that newer upload's row may have been removed with the rest.
    uncovered = [url for url in done.unstored if url in work.removed or url in done.moved]
    for url in uncovered:
        try:
            embed_again(url)
        except Exception as exc:  # noqa: BLE001 - its removal is redelivered, and reconciling again re-sends it
            logger.exception("Sending an uncovered version to be embedded failed", url=url)
            work.fail(work.checks[url], exc)
    logger.info(
        "Reconciled with S3",
        urls=len(work.checks),
        tombstoned=len(done.tombstoned),
        rows=done.removed_rows,
        embed_again=len(uncovered),
    )
    metrics.add_metric(name="RowsDeleted", unit=MetricUnit.Count, value=done.removed_rows)
    metrics.add_metric(name="ObjectsEmbeddedAgain", unit=MetricUnit.Count, value=len(uncovered))
    return models


def embed_again(url: str) -> None:
    """Sends the dispatcher the notification S3 never sends when a removal uncovers an older version."""
    bucket, key = keys.parse_s3_url(url)
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if aws.is_missing(exc):  # removed again meanwhile: that removal's own notification follows
            return
        raise
    record = notifications.object_created(
        bucket,
        key,
        head["ContentLength"],
        keys.bare_etag(head["ETag"]),
        head.get("VersionId"),
        # Says who sent it, for whoever reads the dispatcher's queue.
        sender="clip-indexer-uncovered-version",
        region=os.environ.get("AWS_REGION", "us-east-1"),
    )
    sqs.send_message(QueueUrl=SETTINGS.upload_queue_url, MessageBody=json.dumps({"Records": [record]}))


def keep_up(model_ids: set[str]) -> None:
    """Builds, updates, retrains or compacts each touched store's index when due, measures its recall
    after, and submits a training past this function's bound as a Batch job; never fails the batch."""
    for model_id in sorted(model_ids):
        try:
            lease = S3Lease(s3, keys.s3_url(SETTINGS.output_bucket, keys.training_lease_key(SETTINGS.output_prefix, model_id)))
            done = maintain(store(model_id), POLICY, lease, text_probes(model_id))
        except Exception:  # noqa: BLE001 - the batch's work is committed; the next batch does the upkeep
            logger.exception("Keeping the index up failed; the next batch will do it", model_id=model_id)
            metrics.add_metric(name="IndexUpkeepFailed", unit=MetricUnit.Count, value=1)
            continue
        logger.info(
            "Maintained the index",
            model_id=model_id,
            action=str(done.action),
            seconds=round(done.seconds, 2),
            conflict=done.conflict,
        )
        tuning = done.state.tuning
        if done.measured and tuning is not None:
            report_recall(model_id, tuning)
        if done.deferred is not None:
            defer(model_id, done)


def report_recall(model_id: str, tuning: Tuning) -> None:
    """The search settings readers now use and the recall measured with them; an alarm when short of the target."""
    measured = {"model_id": model_id, **asdict(tuning)}
    if tuning.reached:
        logger.info("Measured the search's recall on the store's own vectors", extra=measured)
        return
    logger.error(
        "No search setting reaches the target recall: searches miss more neighbours than promised; readers use the most "
        "thorough setting measured (docs/search.md, 'Recall')",
        extra=measured,
    )
    metrics.add_metric(name="SearchRecallBelowTarget", unit=MetricUnit.Count, value=1)


def defer(model_id: str, done: Maintenance) -> None:
    """Submits the training this function leaves (one job per due training: clip_store.trainer)."""
    due: dict[str, object] = {
        "model_id": model_id,
        "due": str(done.deferred),
        "rows": done.state.rows,
        "trained_rows": done.state.trained_rows,
    }
    try:
        job_id = submit_training(s3, batch, JOBS, SETTINGS.output_bucket, SETTINGS.output_prefix, model_id, str(done.deferred))
    except Exception:  # noqa: BLE001 - the index keeps serving; the next batch submits again
        logger.exception("Submitting the index's training as a Batch job failed; the next batch tries again", extra=due)
        metrics.add_metric(name="IndexTrainingDeferred", unit=MetricUnit.Count, value=1)
        return
    if job_id is None:
        logger.info("The index's training is already submitted as a Batch job", extra=due)
        return
    logger.warning(
        "The index is due to be trained on more rows than this function trains within its time: submitted as a Batch "
        "job (`clip-pipeline index` shows it); meanwhile new rows still go into the existing index",
        extra={**due, "job_id": job_id, "max_train_rows": POLICY.max_train_rows},
    )
    metrics.add_metric(name="IndexTrainingSubmitted", unit=MetricUnit.Count, value=1)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    work = Work()
    with processor(records=event["Records"], handler=lambda record: collect(record, work)):
        processor.process()
        ingest(work)
        touched = check(work)
        keep_up({*work.shards, *touched})
        for message, error in work.failures.values():
            processor.failure_handler(record=message, exception=(type(error), error, error.__traceback__))
    return processor.response()
