"""Entries -> manifest files, then one AWS Batch job (an array job for several shards) or Lambda lane requests.

Nothing else is written: Batch keeps the job (with its MANIFEST_URI) for the CLI's `status` and
`retry`, and the dispatcher's log line records the submission for as long as the logs are kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from clip_shared import keys
from clip_shared.lane import LaneRequest
from clip_shared.manifest import ManifestEntry, split

# The children's manifest files are independent writes; S3 takes them in parallel.
_PARALLEL_WRITES = 16
#: SQS's SendMessageBatch takes at most ten messages.
_SQS_BATCH = 10


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


def write_manifests(
    s3: Any, output_bucket: str, output_prefix: str, manifest_id: str, entries: Sequence[ManifestEntry], shard_size: int
) -> tuple[str, int]:
    """One manifest file per child of `shard_size` entries; the manifest's uri and its number of children."""
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
    return keys.s3_url(output_bucket, prefix), len(manifests)


def submit_job(
    batch_client: Any,
    manifest_uri: str,
    manifest_id: str,
    children: int,
    job_queue: str,
    job_definition: str,
    earlier_attempts: int = 0,
) -> SubmittedJob:
    """The Batch job of a written manifest; `earlier_attempts` that the Lambda lane made of it, which
    the job's attempts resume from (and count on, before recording what never succeeds)."""
    array_size = children if children > 1 else None
    environment = [{"name": "MANIFEST_URI", "value": manifest_uri}]
    if earlier_attempts:
        environment.append({"name": "EARLIER_ATTEMPTS", "value": str(earlier_attempts)})
    request: dict[str, Any] = {
        "jobName": f"clip-{manifest_id}",
        "jobQueue": job_queue,
        "jobDefinition": job_definition,
        "containerOverrides": {"environment": environment},
    }
    if array_size is not None:
        request["arrayProperties"] = {"size": array_size}
    response = batch_client.submit_job(**request)
    return SubmittedJob(response["jobId"], response["jobName"], manifest_uri, array_size)


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
    manifest_uri, children = write_manifests(s3, output_bucket, output_prefix, manifest_id, entries, shard_size)
    return submit_job(batch_client, manifest_uri, manifest_id, children, job_queue, job_definition)


def send_to_lane(
    s3: Any,
    sqs: Any,
    output_bucket: str,
    output_prefix: str,
    manifest_id: str,
    entries: Sequence[ManifestEntry],
    max_images: int,
    queue_url: str,
) -> tuple[list[LaneRequest], list[LaneRequest]]:
    """The entries as lane requests of at most `max_images` each, one manifest apiece (the first under
    `manifest_id`), sent to the embedding function's queue; returns them, and those SQS would not
    take (twice).

    Once a manifest is written its request must go somewhere: failing the batch then would have its
    redelivery write new manifests and send the objects already queued a second time."""
    parts = [
        (manifest_id if start == 0 else new_manifest_id(datetime.now(UTC)), entries[start : start + max_images])
        for start in range(0, len(entries), max_images)
    ]

    def request(part: tuple[str, Sequence[ManifestEntry]]) -> LaneRequest:
        part_id, part_entries = part
        manifest_uri, _ = write_manifests(s3, output_bucket, output_prefix, part_id, part_entries, len(part_entries))
        return LaneRequest(manifest_uri=manifest_uri, manifest_id=part_id, images=len(part_entries))

    # Independent writes, as a job's children's manifests: S3 takes them in parallel.
    with ThreadPoolExecutor(min(_PARALLEL_WRITES, len(parts))) as pool:
        requests = list(pool.map(request, parts))
    unsent = []
    for start in range(0, len(requests), _SQS_BATCH):
        left = requests[start : start + _SQS_BATCH]
        for _ in range(2):
            messages = [{"Id": str(i), "MessageBody": request.to_json()} for i, request in enumerate(left)]
            try:
                failed = {
                    int(item["Id"]) for item in sqs.send_message_batch(QueueUrl=queue_url, Entries=messages).get("Failed", [])
                }
            except (ClientError, BotoCoreError):
                failed = set(range(len(left)))
            left = [request for i, request in enumerate(left) if i in failed]
            if not left:
                break
        unsent += left
    return requests, unsent
