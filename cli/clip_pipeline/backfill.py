"""`clip-pipeline backfill`: objects S3 events never announced, listed and put through the
dispatcher's own checks (type, size, claim) into array jobs. Safe to run twice: an object already
embedded for its ETag, or already claimed by a submitted job, is counted and left alone."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

from clip_pipeline.submitter import JobSubmitter, Target
from clip_shared import dispatch, keys
from clip_worker.writer import embedded_etag

#: A backfill holds its claims while it lists; an hour is long enough for millions of objects.
CLAIM_TTL = timedelta(hours=1)
COUNTS = ("listed", "already_embedded", "already_submitted", "being_dispatched", "rejected", "superseded", "submitted", "jobs")


def backfill(
    target: Target,
    bucket: str,
    prefix: str,
    on_submitted: Callable[[dispatch.SubmittedJob, int], None] = lambda job, entries: None,
) -> dict[str, int]:
    """Lists s3://bucket/prefix and submits what needs embedding; returns what became of the objects."""
    counts = dict.fromkeys(COUNTS, 0)
    s3, output_bucket, output_prefix = target.s3, target.output_bucket, target.output_prefix
    submitter = JobSubmitter(target, lambda entries: dispatch.release(s3, output_bucket, output_prefix, entries), on_submitted)

    def admit(item: dict[str, Any]) -> Any:
        if embedded_etag(s3, output_bucket, output_prefix, target.model_id, bucket, item["Key"]) == keys.bare_etag(item["ETag"]):
            return "already_embedded"
        return dispatch.admit(s3, dispatch.ObjectRef(bucket, item["Key"]), output_bucket, output_prefix, target.max_object_bytes,
                              submitter.manifest_id, datetime.now(timezone.utc), CLAIM_TTL)

    with ThreadPoolExecutor(16) as pool:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            items = page.get("Contents", [])
            counts["listed"] += len(items)
            admitted = []
            for outcome in pool.map(admit, items):
                if isinstance(outcome, dispatch.Rejection):
                    counts["rejected"] += 1
                elif outcome is dispatch.Claim.DONE:
                    counts["already_submitted"] += 1
                elif outcome is dispatch.Claim.BUSY:
                    counts["being_dispatched"] += 1
                elif outcome is None:
                    counts["superseded"] += 1
                elif isinstance(outcome, str):
                    counts[outcome] += 1
                else:
                    admitted.append(outcome)
            submitter.add(admitted)
        submitter.flush()
    counts["submitted"], counts["jobs"] = submitter.submitted, submitter.jobs
    return counts
