"""What happened to the objects, read back from the output bucket at a cost that grows with the jobs.

Each job child's events batch carries its counts by outcome in its S3 metadata, read with a HEAD
(keys.EVENTS_OUTCOMES_METADATA); rejections, one record per object, are counted by listing their
keys. Counting a million images' outcomes costs about a thousand HEADs and a few LISTs, whatever
the batches hold, and nothing is kept per object. The events themselves are read only where they
are needed, one batch at a time: the failures `retry` resubmits (from the batches whose counts
say they hold some), and a few examples for `status`. A batch written before the counts existed
is read and counted instead.

These are outcomes as recorded: an object recorded twice (a duplicate delivery, a new version, a
failure retried) counts in each child that recorded it. The vector store holds one row per object.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import pyarrow.parquet as pq
from botocore.exceptions import ClientError

from clip_pipeline import jobs, redrive
from clip_pipeline.stack import Clients, Stack
from clip_shared import aws, keys
from clip_shared.events import BatchCounts, EventType

#: Listing and reading many small documents is bound by round trips, not bandwidth.
_PARALLEL_READS = 32
#: Failures and rejections shown by url: enough to see what went wrong, read from a few documents.
EXAMPLES = 20
#: The failures shown come from this many batches at most (a batch is a few MB): failures spread
#: one or two per child would otherwise have `status` download twenty batches to show them.
EXAMPLE_BATCHES = 3
#: Batches read at once for `retry`: what is held while their failures are picked out.
_FAILURE_WINDOW = 8


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    #: The id of the event that recorded it: a new failure of the same object has a new one.
    event_id: str = ""


@dataclass(frozen=True)
class FailedObject:
    """One `document-failed` event, as much of it as `retry` needs."""

    url: str
    #: The ETag of the version that failed.
    etag: str | None
    time: str
    failure: Failure


@dataclass
class Outcomes:
    embedded: int = 0
    #: Failures by error code.
    failed: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    #: A few failures and rejections by url (at most EXAMPLES each).
    failed_examples: dict[str, Failure] = field(default_factory=dict)
    rejected_examples: dict[str, Failure] = field(default_factory=dict)

    @property
    def recorded(self) -> int:
        """Outcomes of every kind."""
        return self.embedded + self.failed.total() + self.rejected

    def as_dict(self) -> dict[str, Any]:
        def examples(found: dict[str, Failure]) -> dict[str, dict[str, str]]:
            return {url: {"code": f.code, "message": f.message} for url, f in sorted(found.items())}

        return {
            "embedded": self.embedded,
            "failed": {
                "count": self.failed.total(),
                "codes": dict(self.failed.most_common()),
                "examples": examples(self.failed_examples),
            },
            "rejected": {"count": self.rejected, "examples": examples(self.rejected_examples)},
        }


def _listing(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _read(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _document(s3: Any, bucket: str, key: str) -> Any:
    """A JSON document; None if it was deleted since it was listed (outputs expired, a job's removed)."""
    try:
        return json.loads(_read(s3, bucket, key))
    except Exception as exc:
        if aws.is_missing(exc):
            return None
        raise


def batch_events(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    """A job child's events batch, read whole (none before its first checkpoint, or once removed)."""
    return list(_document(s3, bucket, key) or [])


def _counts(s3: Any, bucket: str, key: str) -> BatchCounts:
    """One batch's counts: its metadata, or, for a batch written before it existed, its events counted."""
    try:
        counts = BatchCounts.from_metadata(s3.head_object(Bucket=bucket, Key=key)["Metadata"])
    except Exception as exc:
        if aws.is_missing(exc):
            return BatchCounts()
        raise
    return counts if counts is not None else BatchCounts.of(batch_events(s3, bucket, key))


def _batches(s3: Any, bucket: str, prefix: str, model_id: str, pool: ThreadPoolExecutor) -> Iterator[tuple[str, BatchCounts]]:
    """Every child's events batch with its counts, a window of HEADs at a time."""
    listed = (item["Key"] for item in _listing(s3, bucket, keys.events_prefix(prefix, model_id)))
    while window := list(islice(listed, 8 * _PARALLEL_READS)):
        yield from zip(window, pool.map(lambda key: _counts(s3, bucket, key), window), strict=True)


def _failures_in(
    s3: Any, bucket: str, batch_keys: Iterator[str], pool: ThreadPoolExecutor, window: int
) -> Iterator[FailedObject]:
    """The failure events of these batches, read `window` batches at a time: no more than those are held."""
    while keys_ := list(islice(batch_keys, window)):
        for events in pool.map(lambda key: batch_events(s3, bucket, key), keys_):
            for event in events:
                if event["type"] == EventType.FAILED:
                    error, document = event["data"]["error"], event["data"]["document"]
                    failure = Failure(error["code"], error.get("message", ""), event.get("id", ""))
                    yield FailedObject(document["url"], document.get("etag"), event.get("time", ""), failure)


def failures(s3: Any, bucket: str, prefix: str, model_id: str) -> Iterator[FailedObject]:
    """Every `document-failed` event, streamed from the batches that hold any (a HEAD tells which)."""
    with ThreadPoolExecutor(_PARALLEL_READS) as pool:
        with_failures = (key for key, counts in _batches(s3, bucket, prefix, model_id, pool) if counts.failures)
        yield from _failures_in(s3, bucket, with_failures, pool, _FAILURE_WINDOW)


def _rejection(event: dict[str, Any]) -> tuple[str, Failure]:
    error = event["data"].get("error", {})
    return event["data"]["document"]["url"], Failure(error.get("code", ""), error.get("message", ""), event.get("id", ""))


def tally(s3: Any, bucket: str, prefix: str, model_id: str) -> Outcomes:
    """Every child's outcomes counted (a HEAD each), every rejection counted (a LIST per thousand),
    and a few of each by url."""
    outcomes = Outcomes()
    with ThreadPoolExecutor(_PARALLEL_READS) as pool:
        with_failures: list[str] = []
        for key, counts in _batches(s3, bucket, prefix, model_id, pool):
            outcomes.embedded += counts.created
            outcomes.failed.update(counts.failed)
            if counts.failures and len(with_failures) < EXAMPLE_BATCHES:
                with_failures.append(key)
        # One batch at a time: the examples usually sit in the first one.
        found = _failures_in(s3, bucket, iter(with_failures), pool, 1)
        outcomes.failed_examples = {failed.url: failed.failure for failed in islice(found, EXAMPLES)}
        examples: list[str] = []
        for item in _listing(s3, bucket, keys.rejected_prefix(prefix)):
            outcomes.rejected += 1
            if len(examples) < EXAMPLES:
                examples.append(item["Key"])
        rejections = pool.map(lambda key: _document(s3, bucket, key), examples)
        outcomes.rejected_examples = dict(_rejection(event) for event in rejections if event is not None)
    return outcomes


def embedded_etags(s3: Any, bucket: str, prefix: str, model_id: str) -> dict[str, str]:
    """url -> the ETag of the version last embedded, from the shards' url and etag columns."""
    shards = sorted(
        _listing(s3, bucket, keys.parquet_prefix(prefix, model_id)), key=lambda item: (item["LastModified"], item["Key"])
    )
    with ThreadPoolExecutor(_PARALLEL_READS) as pool:
        tables = pool.map(lambda item: pq.read_table(io.BytesIO(_read(s3, bucket, item["Key"])), columns=["url", "etag"]), shards)
        etags: dict[str, str] = {}
        for table in tables:
            etags.update(zip(table.column("url").to_pylist(), table.column("etag").to_pylist(), strict=True))
    return etags


@dataclass(frozen=True)
class Backlog:
    """Uploads the dispatcher has not taken yet."""

    waiting: int
    #: Received by the dispatcher and neither finished nor given back yet.
    in_flight: int
    #: The oldest message's age in seconds, SQS's ApproximateAgeOfOldestMessage over the last 10
    #: minutes; None without a datapoint (an emulator, a queue idle that long, or no permission to read it).
    oldest_s: int | None

    def as_dict(self) -> dict[str, int | None]:
        return {"waiting": self.waiting, "in_flight": self.in_flight, "oldest_s": self.oldest_s}


def backlog(clients: Clients, queue_url: str) -> Backlog:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = clients.client("sqs").get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    now = datetime.now(UTC)
    try:
        points = clients.client("cloudwatch").get_metric_statistics(
            Namespace="AWS/SQS",
            MetricName="ApproximateAgeOfOldestMessage",
            Dimensions=[{"Name": "QueueName", "Value": queue_url.rsplit("/", 1)[-1]}],
            StartTime=now - timedelta(minutes=10),
            EndTime=now,
            Period=60,
            Statistics=["Maximum"],
        )["Datapoints"]
    except ClientError:  # no cloudwatch:GetMetricStatistics: the counts still answer
        points = []
    oldest = max(points, key=lambda point: point["Timestamp"])["Maximum"] if points else None
    return Backlog(int(attributes[names[0]]), int(attributes[names[1]]), None if oldest is None else int(oldest))


@dataclass(frozen=True)
class Status:
    #: The stack's jobs (array parents) by state.
    jobs: dict[str, int]
    outcomes: Outcomes
    dead_letters: int
    #: The jobs waiting in RUNNABLE, oldest first, with Batch's reason (jobs.waiting).
    waiting: list[dict[str, Any]]
    uploads: Backlog
    #: The Lambda lane's requests waiting for its function, and those handed back for Batch (None on a
    #: stack deployed before the lane, which has neither queue).
    lane: Backlog | None = None
    lane_fallbacks: Backlog | None = None
    #: The index jobs (IndexJobQueue) by state (None on a stack deployed before that queue).
    index_jobs: dict[str, int] | None = None


def _jobs_by_state(batch_client: Any, queue: str) -> dict[str, int]:
    """A job queue's jobs (array parents) by state."""
    counts = {}
    for state in jobs.STATES:
        pages = batch_client.get_paginator("list_jobs").paginate(jobQueue=queue, jobStatus=state)
        counts[state] = sum(1 for page in pages for job in page["jobSummaryList"] if ":" not in job["jobId"])
    return counts


def status(clients: Clients, stack: Stack) -> Status:
    """The stack's jobs by state, those waiting for an instance and why, every object's outcome, the
    uploads not dispatched yet, how many messages wait in the dead-letter queue, and the index jobs by state."""
    batch_client = clients.client("batch")
    counts = _jobs_by_state(batch_client, stack.output("JobQueueArn"))
    waiting = jobs.waiting(batch_client, stack.output("JobQueueArn")) if counts["RUNNABLE"] else []
    outcomes = tally(
        clients.client("s3"), stack.output("OutputBucketName"), stack.output_prefix, keys.model_id(stack.model, stack.pretrained)
    )
    dead_letters = redrive.waiting(clients.client("sqs"), stack.output("DeadLetterQueueUrl"))
    lane, lane_fallbacks = (
        backlog(clients, stack.outputs[name]) if name in stack.outputs else None
        for name in ("EmbedQueueUrl", "LaneFallbackQueueUrl")
    )
    index_queue = stack.outputs.get("IndexJobQueueArn")
    index_jobs = _jobs_by_state(batch_client, index_queue) if index_queue else None
    uploads = backlog(clients, stack.output("UploadQueueUrl"))
    return Status(counts, outcomes, dead_letters, waiting, uploads, lane, lane_fallbacks, index_jobs)
