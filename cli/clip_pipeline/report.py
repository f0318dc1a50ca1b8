"""What happened to every object, read back from the output bucket at one request per job child.

The outcomes come from the children's CloudEvents batches (and the dispatcher's rejections, which
are per object and rare), the embedded ETags from the Parquet shards' url and etag columns: reading
a million images' outcomes costs about a thousand GETs, not a million. An object embedded twice (a
duplicate delivery, or a new version) counts once: its latest event wins.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.parquet as pq
from botocore.exceptions import ClientError

from clip_pipeline import jobs, redrive
from clip_pipeline.stack import Clients, Stack
from clip_shared import keys
from clip_shared.events import EventType

#: Listing and reading many small documents is bound by round trips, not bandwidth.
_PARALLEL_READS = 32


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    #: The id of the event that recorded it: a new failure of the same object has a new one.
    event_id: str = ""


@dataclass
class Outcomes:
    embedded: set[str] = field(default_factory=set)
    failed: dict[str, Failure] = field(default_factory=dict)
    rejected: dict[str, Failure] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "embedded": len(self.embedded),
            "failed": {url: {"code": f.code, "message": f.message} for url, f in sorted(self.failed.items())},
            "rejected": {url: {"code": r.code, "message": r.message} for url, r in sorted(self.rejected.items())},
        }


def _listing(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item for page in pages for item in page.get("Contents", [])]


def _read(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _bodies(s3: Any, bucket: str, keys_: list[str], pool: ThreadPoolExecutor) -> Iterator[bytes]:
    """Each object's body, read in parallel a window at a time: what waits to be parsed stays bounded."""
    window = 8 * _PARALLEL_READS
    for start in range(0, len(keys_), window):
        yield from pool.map(lambda key: _read(s3, bucket, key), keys_[start : start + window])


def tally(s3: Any, bucket: str, prefix: str, model_id: str) -> Outcomes:
    """Every object's latest outcome. Events are read as a stream and only each url's latest is
    kept, as a few fields: memory grows with the objects, not with every event's whole document."""
    batches = [item["Key"] for item in _listing(s3, bucket, keys.events_prefix(prefix, model_id))]
    rejections = [item["Key"] for item in _listing(s3, bucket, keys.rejected_prefix(prefix))]
    # url -> (time, type, why): the latest event wins, and of two at the same time the one read last.
    latest: dict[str, tuple[str, str, Failure | None]] = {}

    def take(event: dict[str, Any]) -> None:
        url, time = event["data"]["document"]["url"], event.get("time", "")
        seen = latest.get(url)
        if seen is not None and time < seen[0]:
            return
        failure = None
        if event["type"] != EventType.CREATED:
            error = event["data"].get("error", {})
            failure = Failure(error.get("code", ""), error.get("message", ""), event.get("id", ""))
        latest[url] = (time, event["type"], failure)

    with ThreadPoolExecutor(_PARALLEL_READS) as pool:
        for body in _bodies(s3, bucket, batches, pool):
            for event in json.loads(body):
                take(event)
        for body in _bodies(s3, bucket, rejections, pool):
            take(json.loads(body))
    outcomes = Outcomes()
    for url, (_, kind, failure) in latest.items():
        if failure is None:
            outcomes.embedded.add(url)
        elif kind == EventType.FAILED:
            outcomes.failed[url] = failure
        else:
            outcomes.rejected[url] = failure
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


def status(clients: Clients, stack: Stack) -> Status:
    """The stack's jobs by state, those waiting for an instance and why, every object's outcome, the
    uploads not dispatched yet, and how many messages wait in the dead-letter queue."""
    batch_client = clients.client("batch")
    counts = {}
    for state in jobs.STATES:
        pages = batch_client.get_paginator("list_jobs").paginate(jobQueue=stack.output("JobQueueArn"), jobStatus=state)
        counts[state] = sum(1 for page in pages for job in page["jobSummaryList"] if ":" not in job["jobId"])
    waiting = jobs.waiting(batch_client, stack.output("JobQueueArn")) if counts["RUNNABLE"] else []
    outcomes = tally(
        clients.client("s3"), stack.output("OutputBucketName"), stack.output_prefix, keys.model_id(stack.model, stack.pretrained)
    )
    dead_letters = redrive.waiting(clients.client("sqs"), stack.output("DeadLetterQueueUrl"))
    return Status(counts, outcomes, dead_letters, waiting, backlog(clients, stack.output("UploadQueueUrl")))
