"""The stack's Batch jobs as the CLI reads them: which exist in a state, and what their manifests hold."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from clip_shared import keys
from clip_shared.manifest import Manifest, ManifestEntry

#: States of a job that has not ended: its objects may still be embedded.
ACTIVE = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")
STATES = (*ACTIVE, "SUCCEEDED", "FAILED")


def jobs(batch_client: Any, job_queue: str, states: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The queue's jobs in `states` (array parents, not their children), described."""
    for state in states:
        pages = batch_client.get_paginator("list_jobs").paginate(jobQueue=job_queue, jobStatus=state)
        ids = [job["jobId"] for page in pages for job in page["jobSummaryList"] if ":" not in job["jobId"]]
        for start in range(0, len(ids), 100):  # DescribeJobs takes at most 100 ids
            yield from batch_client.describe_jobs(jobs=ids[start : start + 100])["jobs"]


def manifest_entries(s3: Any, job: dict[str, Any]) -> list[ManifestEntry]:
    """Every entry of a job submitted by the pipeline (none for a job without a MANIFEST_URI)."""
    environment = {item["name"]: item["value"] for item in job.get("container", {}).get("environment", [])}
    if "MANIFEST_URI" not in environment:
        return []
    bucket, prefix = keys.parse_s3_url(environment["MANIFEST_URI"])
    entries: list[ManifestEntry] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            entries += Manifest.from_json(body, source=keys.s3_url(bucket, item["Key"])).entries
    return entries


def waiting(batch_client: Any, job_queue: str) -> list[dict[str, str]]:
    """The queue's jobs in RUNNABLE, oldest first, each with Batch's reason it has not started (its
    statusReason: e.g. CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY, or MISCONFIGURATION:... for a quota,
    instance types or subnets that can never start it)."""
    found = [
        {
            "job_id": job["jobId"],
            "name": job.get("jobName", ""),
            "since": datetime.fromtimestamp(job["createdAt"] / 1000, UTC).isoformat(timespec="seconds")
            if job.get("createdAt")
            else "",
            "reason": job.get("statusReason", "") or "no reason given yet",
        }
        for job in jobs(batch_client, job_queue, ["RUNNABLE"])
    ]
    return sorted(found, key=lambda job: job["since"])


def cancel_waiting_command(job_queue: str, region: str | None) -> str:
    """One shell command that cancels every job of the queue waiting in RUNNABLE now (they end FAILED,
    and `clip-pipeline retry --failed-jobs` resubmits their objects once the cause is fixed)."""
    where = f" --region {shlex.quote(region)}" if region else ""
    return (
        f"aws batch list-jobs{where} --job-queue {shlex.quote(job_queue)} --job-status RUNNABLE "
        "--query 'jobSummaryList[].jobId' --output text | xargs -n 1 "
        f"aws batch cancel-job{where} --reason 'cancelled by the operator: waiting in RUNNABLE' --job-id"
    )
