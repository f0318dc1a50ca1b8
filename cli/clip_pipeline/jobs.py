"""The stack's Batch jobs as the CLI reads them: which exist in a state, and what their manifests hold."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from clip_shared import aws, keys
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


def _manifest_uri(job: dict[str, Any]) -> str | None:
    environment = {item["name"]: item["value"] for item in job.get("container", {}).get("environment", [])}
    return environment.get("MANIFEST_URI")


def manifest_entries(s3: Any, job: dict[str, Any]) -> list[ManifestEntry]:
    """Every entry of a job submitted by the pipeline (none for a job without a MANIFEST_URI)."""
    uri = _manifest_uri(job)
    if uri is None:
        return []
    bucket, prefix = keys.parse_s3_url(uri)
    entries: list[ManifestEntry] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            entries += Manifest.from_json(body, source=keys.s3_url(bucket, item["Key"])).entries
    return entries


def failed_children(batch_client: Any, job: dict[str, Any]) -> list[int]:
    """The array indexes of a failed job's children that failed (a child that succeeded recorded an
    outcome for each of its entries); [0] for a job that is not an array."""
    if not job.get("arrayProperties", {}).get("size"):
        return [0]
    pages = batch_client.get_paginator("list_jobs").paginate(arrayJobId=job["jobId"], jobStatus="FAILED")
    return sorted(int(child["jobId"].rsplit(":", 1)[1]) for page in pages for child in page["jobSummaryList"])


def child_manifest(s3: Any, job: dict[str, Any], index: int) -> Manifest | None:
    """The manifest of a job's child `index` (None for a job without a MANIFEST_URI, or a manifest gone)."""
    uri = _manifest_uri(job)
    if uri is None:
        return None
    bucket, prefix = keys.parse_s3_url(uri)
    key = prefix + keys.manifest_shard_name(index)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        if aws.is_missing(exc):
            return None
        raise
    return Manifest.from_json(body, source=keys.s3_url(bucket, key))


def waiting(batch_client: Any, job_queue: str) -> list[dict[str, Any]]:
    """The queue's jobs waiting in RUNNABLE, oldest first, each with Batch's reason it has not started
    (its statusReason: CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY, or MISCONFIGURATION:... for a quota,
    instance types or subnets that can never start it). An array job's children wait on their own
    (the parent stays PENDING): they are reported under their parent, with how many wait."""
    pages = batch_client.get_paginator("list_jobs").paginate(jobQueue=job_queue, jobStatus="RUNNABLE")
    ids = [job["jobId"] for page in pages for job in page["jobSummaryList"]]
    # DescribeJobs takes at most 100 ids.
    described = [
        job for start in range(0, len(ids), 100) for job in batch_client.describe_jobs(jobs=ids[start : start + 100])["jobs"]
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in described:
        groups.setdefault(job["jobId"].split(":")[0], []).append(job)
    found = []
    for job_id, members in groups.items():
        first = min(members, key=lambda job: job.get("createdAt", 0))
        reasons = [job["statusReason"] for job in members if job.get("statusReason")]
        found.append(
            {
                "job_id": job_id,
                "name": first.get("jobName", ""),
                "since": datetime.fromtimestamp(first["createdAt"] / 1000, UTC).isoformat(timespec="seconds")
                if first.get("createdAt")
                else "",
                "waiting": len(members),
                "reason": reasons[0] if reasons else "no reason given yet",
            }
        )
    return sorted(found, key=lambda entry: entry["since"])


def cancel_waiting_command(job_queue: str, region: str | None) -> str:
    """One shell command that cancels every job of the queue waiting in RUNNABLE now (they end FAILED,
    and `clip-pipeline retry --failed-jobs` resubmits their objects once the cause is fixed)."""
    where = f" --region {shlex.quote(region)}" if region else ""
    # Array children are listed as parent:index; cancelling the parent cancels its children that wait.
    return (
        f"aws batch list-jobs{where} --job-queue {shlex.quote(job_queue)} --job-status RUNNABLE "
        "--query 'jobSummaryList[].jobId' --output text | tr '\\t' '\\n' | cut -d: -f1 | sort -u | xargs -n 1 "
        f"aws batch cancel-job{where} --reason 'cancelled by the operator: waiting in RUNNABLE' --job-id"
    )
