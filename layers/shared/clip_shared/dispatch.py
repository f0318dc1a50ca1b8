"""From S3 objects to one submitted Batch job: inspect, reject, claim, write the manifest, submit.

Used by the dispatcher Lambda for each SQS batch and by any caller that has a list of objects
(a backfill). Every function takes its boto3 clients as arguments, so callers decide how clients
are built; build them with `CLIENT_CONFIG` to get the retry behaviour the pipeline relies on.

Duplicate deliveries are stopped by one claim object per object version in the output bucket,
created with a conditional write (`If-None-Match: *`), so two concurrent deliveries cannot both
win. A claim names the manifest that owns it; the owner is done once that manifest's job record
exists. A claim whose owner never wrote a job record (its SubmitJob failed, or the invocation
died) is released or, once older than `claim_ttl`, taken over, so an object is never lost to a
claim nobody will honour.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError

from clip_shared import keys, mime
from clip_shared.events import ErrorCode, EventType, document_event, document_ref, to_json
from clip_shared.manifest import Manifest, ManifestEntry

#: Standard mode retries throttling (SubmitJob's TooManyRequestsException included), 5xx and
#: connection errors with exponential backoff and jitter; 8 attempts ride out about a minute.
CLIENT_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 8})

#: AWS Batch accepts array jobs of 2 to 10,000 children.
MAX_ARRAY_SIZE = 10_000

_MISSING = {"404", "NoSuchKey", "NoSuchVersion"}
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
# Deletes and marker writes of many objects are independent; S3 serves them in parallel.
_PARALLEL_REQUESTS = 16


@dataclass(frozen=True)
class ObjectRef:
    """An object as a notification (or a listing) names it; the key is already URL-decoded."""

    bucket: str
    key: str
    version_id: str | None = None


@dataclass(frozen=True)
class Rejection:
    ref: ObjectRef
    code: ErrorCode
    message: str
    mime_type: str | None = None
    size: int | None = None
    etag: str | None = None


class Claim(StrEnum):
    CLAIMED = "claimed"  # this caller owns the object and must submit it, or release the claim
    DONE = "done"  # a job for this object version was already submitted: a duplicate delivery
    BUSY = "busy"  # another caller is submitting it right now; try again later


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    job_name: str
    manifest_uri: str
    array_size: int | None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def inspect_object(s3: Any, ref: ObjectRef, max_object_bytes: int) -> ManifestEntry | Rejection | None:
    """Decide from the object's metadata and first bytes whether the worker may embed it.

    None means there is nothing to do: a newer version replaced this one, and the newer
    version's own notification covers it.
    """
    # The current version, not the notified one: a version hidden by a delete marker was deleted.
    try:
        head = s3.head_object(Bucket=ref.bucket, Key=ref.key)
    except ClientError as exc:
        if _code(exc) in _MISSING:
            return Rejection(ref, ErrorCode.NOT_FOUND, "the object was deleted before it could be dispatched")
        raise
    version_id = head.get("VersionId")
    if ref.version_id is not None and version_id != ref.version_id:
        return None
    size = int(head["ContentLength"])
    etag = keys.bare_etag(head["ETag"])
    if size > max_object_bytes:
        return Rejection(ref, ErrorCode.TOO_LARGE, f"{size} bytes exceeds the {max_object_bytes}-byte limit",
                         size=size, etag=etag)
    head_bytes = _first_bytes(s3, ref, version_id, etag) if size else b""
    if head_bytes is None:
        return None
    detected = mime.sniff_mime(head_bytes)
    if not mime.is_accepted(detected):
        what = detected or "not a recognised format"
        declared = head.get("ContentType", "unset")
        return Rejection(ref, ErrorCode.UNSUPPORTED_TYPE, f"content is {what} (declared Content-Type: {declared})",
                         mime_type=detected, size=size, etag=etag)
    return ManifestEntry(bucket=ref.bucket, key=ref.key, size=size, etag=etag, mime_type=str(detected),
                         version_id=version_id)


def _first_bytes(s3: Any, ref: ObjectRef, version_id: str | None, etag: str) -> bytes | None:
    # Pinned to what head_object saw, so the bytes sniffed belong to the object the manifest names.
    pin = {"VersionId": version_id} if version_id else {"IfMatch": etag}
    try:
        response = s3.get_object(Bucket=ref.bucket, Key=ref.key, Range=f"bytes=0-{mime.SNIFF_BYTES - 1}", **pin)
    except ClientError as exc:
        if _code(exc) in _LOST_RACE | _MISSING:
            return None
        raise
    return response["Body"].read()


def record_rejection(s3: Any, output_bucket: str, output_prefix: str, rejection: Rejection, chain_id: str) -> str:
    """Write the `document-rejected` CloudEvent for one object; returns its key."""
    ref = rejection.ref
    document = document_ref(keys.s3_url(ref.bucket, ref.key), rejection.mime_type, rejection.size, rejection.etag)
    event = document_event(EventType.REJECTED, document, chain_id, component="dispatcher",
                           error=(rejection.code, rejection.message))
    key = keys.rejection_key(output_prefix, ref.bucket, ref.key)
    s3.put_object(Bucket=output_bucket, Key=key, Body=to_json(event), ContentType="application/cloudevents+json")
    return key


def new_manifest_id(now: datetime) -> str:
    """Sortable by time, unique without coordination."""
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"


def new_manifest(entries: Iterable[ManifestEntry], shard_size: int, manifest_id: str) -> Manifest:
    manifest = Manifest(manifest_id=manifest_id, shard_size=shard_size, entries=tuple(entries))
    if manifest.shard_count > MAX_ARRAY_SIZE:
        raise ValueError(
            f"{len(manifest.entries)} entries in shards of {shard_size} need {manifest.shard_count} array children; "
            f"Batch allows {MAX_ARRAY_SIZE}: split the entries or raise the shard size"
        )
    return manifest


def claim_key(output_prefix: str, entry: ManifestEntry) -> str:
    identity = "\0".join((entry.bucket, entry.key, entry.version_id or entry.etag))
    return f"{keys.normalise_prefix(output_prefix)}claims/{hashlib.sha256(identity.encode()).hexdigest()}.json"


def job_record_key(output_prefix: str, manifest_id: str) -> str:
    return f"{keys.normalise_prefix(output_prefix)}jobs/{manifest_id}.json"


def claim(
    s3: Any,
    output_bucket: str,
    output_prefix: str,
    entry: ManifestEntry,
    manifest_id: str,
    now: datetime,
    claim_ttl: timedelta,
) -> Claim:
    """Claim one object version for `manifest_id`.

    `claim_ttl` must exceed the longest time a claimant can run (the Lambda timeout): a claim
    that old whose manifest has no job record belongs to a caller that is gone.
    """
    key = claim_key(output_prefix, entry)
    body = json.dumps({"manifestId": manifest_id, "claimedAt": now.isoformat()}).encode()
    try:
        s3.put_object(Bucket=output_bucket, Key=key, Body=body, ContentType="application/json", IfNoneMatch="*")
        return Claim.CLAIMED
    except ClientError as exc:
        if _code(exc) not in _LOST_RACE:
            raise
    try:
        existing = s3.get_object(Bucket=output_bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in _MISSING:  # released between our write and this read
            return Claim.BUSY
        raise
    owner = json.loads(existing["Body"].read())
    if _exists(s3, output_bucket, job_record_key(output_prefix, owner["manifestId"])):
        return Claim.DONE
    if now - datetime.fromisoformat(owner["claimedAt"]) < claim_ttl:
        return Claim.BUSY
    try:
        s3.put_object(Bucket=output_bucket, Key=key, Body=body, ContentType="application/json",
                      IfMatch=existing["ETag"])
        return Claim.CLAIMED
    except ClientError as exc:
        if _code(exc) in _LOST_RACE | _MISSING:
            return Claim.BUSY
        raise


def admit(
    s3: Any,
    ref: ObjectRef,
    output_bucket: str,
    output_prefix: str,
    max_object_bytes: int,
    manifest_id: str,
    now: datetime,
    claim_ttl: timedelta,
) -> ManifestEntry | Rejection | Claim | None:
    """Inspect one object and claim it for `manifest_id`, as every path into a job does.

    Returns the claimed entry, the rejection (already recorded), `Claim.DONE` or `Claim.BUSY`
    for an object another manifest holds, or None for a version a newer one replaced.
    """
    outcome = inspect_object(s3, ref, max_object_bytes)
    if isinstance(outcome, Rejection):
        record_rejection(s3, output_bucket, output_prefix, outcome, manifest_id)
        return outcome
    if outcome is None:
        return None
    state = claim(s3, output_bucket, output_prefix, outcome, manifest_id, now, claim_ttl)
    return outcome if state is Claim.CLAIMED else state


def release(s3: Any, output_bucket: str, output_prefix: str, entries: Iterable[ManifestEntry]) -> None:
    """Give up claims after a failed submission, so a redelivery can claim the objects at once."""
    claim_keys = [claim_key(output_prefix, entry) for entry in entries]
    with ThreadPoolExecutor(_PARALLEL_REQUESTS) as pool:
        list(pool.map(lambda key: s3.delete_object(Bucket=output_bucket, Key=key), claim_keys))


def _exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _code(exc) in _MISSING:
            return False
        raise


def submit(
    s3: Any,
    batch: Any,
    output_bucket: str,
    output_prefix: str,
    manifest: Manifest,
    job_queue: str,
    job_definition: str,
) -> SubmittedJob:
    """Write the manifest, submit one job for it (an array job when it has several shards), and
    record the submission, which marks every claim the manifest holds as done."""
    manifest_key = keys.manifest_key(output_prefix, manifest.manifest_id)
    s3.put_object(Bucket=output_bucket, Key=manifest_key, Body=manifest.to_json(), ContentType="application/json")
    manifest_uri = keys.s3_url(output_bucket, manifest_key)
    array_size = manifest.shard_count if manifest.shard_count > 1 else None
    request: dict[str, Any] = {
        "jobName": f"clip-{manifest.manifest_id}",
        "jobQueue": job_queue,
        "jobDefinition": job_definition,
        "containerOverrides": {"environment": [{"name": "MANIFEST_URI", "value": manifest_uri}]},
    }
    if array_size is not None:
        request["arrayProperties"] = {"size": array_size}
    response = batch.submit_job(**request)
    job = SubmittedJob(response["jobId"], response["jobName"], manifest_uri, array_size)
    record = {
        "jobId": job.job_id,
        "jobName": job.job_name,
        "jobQueue": job_queue,
        "jobDefinition": job_definition,
        "manifestUri": manifest_uri,
        "arraySize": array_size,
        "entries": len(manifest.entries),
        "submittedAt": datetime.now(timezone.utc).isoformat(),
    }
    s3.put_object(Bucket=output_bucket, Key=job_record_key(output_prefix, manifest.manifest_id),
                  Body=json.dumps(record).encode(), ContentType="application/json")
    return job
