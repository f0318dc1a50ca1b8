"""`clip-pipeline backfill`: objects S3 events never announced, listed and put through the
dispatcher's own admission (type, size) into array jobs.

Safe to run twice without any per-object write: an object whose current ETag is already in the
stack's shards, or in the manifest of a job that has not ended, is counted and left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

from clip_dispatch.admission import ObjectRef, Verdict, admit, record_rejection
from clip_dispatch.submission import SubmittedJob
from clip_pipeline import jobs, report
from clip_pipeline.submitter import JobSubmitter, Target
from clip_shared import keys
from clip_shared.manifest import ManifestEntry


class Skipped(StrEnum):
    """Why a listed object is left alone without asking S3 about it."""

    ALREADY_EMBEDDED = "already_embedded"
    ALREADY_SUBMITTED = "already_submitted"


COUNTS = ("listed", *Skipped, Verdict.REJECTED, Verdict.SUPERSEDED, "submitted", "jobs")


def backfill(
    target: Target,
    bucket: str,
    prefix: str,
    on_submitted: Callable[[SubmittedJob, int], None] = lambda job, entries: None,
    on_page: Callable[[dict[str, int]], None] = lambda counts: None,
    threads: int = 32,
) -> dict[str, int]:
    """Lists s3://bucket/prefix and submits what needs embedding; returns what became of the objects.

    Admission is a ranged GET an object, a wait on S3: `threads` of them at once set the pace (about
    threads / 30 ms objects a second from inside the region).
    """
    counts = dict.fromkeys(COUNTS, 0)
    s3 = target.s3
    embedded = report.embedded_etags(s3, target.output_bucket, target.output_prefix, target.model_id)
    pending = {
        (entry.url, entry.etag)
        for job in jobs.jobs(target.batch_client, target.job_queue, jobs.ACTIVE)
        for entry in jobs.manifest_entries(s3, job)
    }
    submitter = JobSubmitter(target, on_submitted=on_submitted)

    def admit_listed(item: dict[str, Any]) -> tuple[Verdict | Skipped, ManifestEntry | None]:
        url, etag = keys.s3_url(bucket, item["Key"]), keys.bare_etag(item["ETag"])
        if embedded.get(url) == etag:
            return Skipped.ALREADY_EMBEDDED, None
        if (url, etag) in pending:
            return Skipped.ALREADY_SUBMITTED, None
        admission = admit(s3, ObjectRef(bucket, item["Key"]), target.max_object_bytes)
        if admission.rejection is not None:
            record_rejection(s3, target.output_bucket, target.output_prefix, admission.rejection, submitter.manifest_id)
        return admission.verdict, admission.entry

    with ThreadPoolExecutor(threads) as pool:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            items = page.get("Contents", [])
            counts["listed"] += len(items)
            for verdict, entry in pool.map(admit_listed, items):
                if entry is not None:
                    submitter.add([entry])
                elif verdict != Verdict.ACCEPTED:
                    counts[verdict] += 1
            counts["submitted"] = submitter.submitted + len(submitter.entries)
            on_page(counts)
    submitter.flush()
    counts["submitted"], counts["jobs"] = submitter.submitted, submitter.jobs
    return counts
