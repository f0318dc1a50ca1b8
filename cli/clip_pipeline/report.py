"""What happened to every object, read back from the output bucket at one request per job child.

The outcomes come from the children's CloudEvents batches (and the dispatcher's rejections, which
are per object and rare), the embedded ETags from the Parquet shards' url and etag columns: reading
a million images' outcomes costs about a thousand GETs, not a million. An object embedded twice (a
duplicate delivery, or a new version) counts once: its latest event wins.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

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


def tally(s3: Any, bucket: str, prefix: str, model_id: str) -> Outcomes:
    batches = [item["Key"] for item in _listing(s3, bucket, keys.events_prefix(prefix, model_id))]
    rejections = [item["Key"] for item in _listing(s3, bucket, keys.rejected_prefix(prefix))]
    with ThreadPoolExecutor(_PARALLEL_READS) as pool:
        events = [event for body in pool.map(lambda key: _read(s3, bucket, key), batches) for event in json.loads(body)]
        events += [json.loads(body) for body in pool.map(lambda key: _read(s3, bucket, key), rejections)]
    latest: dict[str, dict[str, Any]] = {}
    for event in sorted(events, key=lambda event: event.get("time", "")):
        latest[event["data"]["document"]["url"]] = event
    outcomes = Outcomes()
    for url, event in latest.items():
        error = event["data"].get("error", {})
        failure = Failure(error.get("code", ""), error.get("message", ""), event.get("id", ""))
        if event["type"] == EventType.CREATED:
            outcomes.embedded.add(url)
        elif event["type"] == EventType.FAILED:
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
class Status:
    #: The stack's jobs (array parents) by state.
    jobs: dict[str, int]
    outcomes: Outcomes
    dead_letters: int
    #: The jobs waiting in RUNNABLE, oldest first, with Batch's reason (jobs.waiting).
    waiting: list[dict[str, Any]]


def status(clients: Clients, stack: Stack) -> Status:
    """The stack's jobs by state, those waiting for an instance and why, every object's outcome, and how
    many messages wait in the dead-letter queue."""
    batch_client = clients.client("batch")
    counts = {}
    for state in jobs.STATES:
        pages = batch_client.get_paginator("list_jobs").paginate(jobQueue=stack.output("JobQueueArn"), jobStatus=state)
        counts[state] = sum(1 for page in pages for job in page["jobSummaryList"] if ":" not in job["jobId"])
    waiting = jobs.waiting(batch_client, stack.output("JobQueueArn")) if counts["RUNNABLE"] else []
    outcomes = tally(
        clients.client("s3"), stack.output("OutputBucketName"), stack.output_prefix, keys.model_id(stack.model, stack.pretrained)
    )
    return Status(counts, outcomes, redrive.waiting(clients.client("sqs"), stack.output("DeadLetterQueueUrl")), waiting)
