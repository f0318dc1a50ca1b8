"""The stack's Batch jobs as the CLI reads them: which exist in a state, and what their manifests hold."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
