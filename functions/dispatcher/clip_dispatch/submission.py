"""Entries -> one AWS Batch job: its manifest files, then SubmitJob (an array job for several shards).

Nothing else is written: Batch keeps the job (with its MANIFEST_URI) for the CLI's `status` and
`retry`, and the dispatcher's log line records the submission for as long as the logs are kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
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
    """Write one manifest file per child, then submit the job."""
    manifests = split(manifest_id, entries, shard_size)
    prefix = keys.manifest_prefix(output_prefix, manifest_id)
    with ThreadPoolExecutor(min(_PARALLEL_WRITES, len(manifests))) as pool:
        list(
            pool.map(
                lambda manifest: s3.put_object(
                    Bucket=output_bucket,
                    Key=prefix + keys.manifest_shard_name(manifest.shard_index),
                    Body=manifest.to_json(),
                    ContentType="application/json",
                ),
                manifests,
            )
        )
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
    return SubmittedJob(response["jobId"], response["jobName"], manifest_uri, array_size)
