"""Entries -> one AWS Batch job: its manifest files, SubmitJob (an array job for several shards), and
the job record the CLI's `status` and `retry` read."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from clip_shared import keys
from clip_shared.manifest import ManifestEntry, split

# The children's manifest files are independent writes; S3 takes them in parallel.
_PARALLEL_WRITES = 16


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    job_name: str
    manifest_uri: str
    array_size: int | None


def new_manifest_id(now: datetime) -> str:
    """Sortable by time, unique without coordination."""
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"


def dedupe(entries: Sequence[ManifestEntry]) -> list[ManifestEntry]:
    """One entry per object version: a message delivered twice in one batch is embedded once."""
    return list({(entry.bucket, entry.key, entry.version_id or entry.etag): entry for entry in entries}.values())


def submit(
    s3: Any,
    batch_client: Any,
    output_bucket: str,
    output_prefix: str,
    manifest_id: str,
    entries: Sequence[ManifestEntry],
    shard_size: int,
    job_queue: str,
    job_definition: str,
) -> SubmittedJob:
    """Write one manifest file per child, submit the job, record the submission."""
    manifests = split(manifest_id, entries, shard_size)
    prefix = keys.manifest_prefix(output_prefix, manifest_id)
    with ThreadPoolExecutor(min(_PARALLEL_WRITES, len(manifests))) as pool:
        list(pool.map(lambda manifest: s3.put_object(
            Bucket=output_bucket, Key=prefix + keys.manifest_shard_name(manifest.shard_index),
            Body=manifest.to_json(), ContentType="application/json"), manifests))
    manifest_uri = keys.s3_url(output_bucket, prefix)
    array_size = len(manifests) if len(manifests) > 1 else None
    request: dict[str, Any] = {
        "jobName": f"clip-{manifest_id}",
        "jobQueue": job_queue,
        "jobDefinition": job_definition,
        "containerOverrides": {"environment": [{"name": "MANIFEST_URI", "value": manifest_uri}]},
    }
    if array_size is not None:
        request["arrayProperties"] = {"size": array_size}
    response = batch_client.submit_job(**request)
    job = SubmittedJob(response["jobId"], response["jobName"], manifest_uri, array_size)
    record = {
        "jobId": job.job_id,
        "jobName": job.job_name,
        "jobQueue": job_queue,
        "jobDefinition": job_definition,
        "manifestUri": manifest_uri,
        "arraySize": array_size,
        "entries": len(entries),
        "submittedAt": datetime.now(timezone.utc).isoformat(),
    }
    s3.put_object(Bucket=output_bucket, Key=keys.job_record_key(output_prefix, manifest_id),
                  Body=json.dumps(record).encode(), ContentType="application/json")
    return job
