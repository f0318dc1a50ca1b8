"""Is this object one the worker may embed? Decided from one ranged GET of its first bytes.

The GET answers everything at once: the object's real type (from its bytes, never its name or
Content-Type), its size (the Content-Range total), its ETag and its current version. No HEAD, and
no per-object write: a duplicate delivery may put an object into two jobs, which costs one more
embedding and writes nothing wrong (readers keep one row per object; see docs/scale.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from clip_shared import aws, keys, mime
from clip_shared.events import ErrorCode, EventType, document_event, document_ref, to_json
from clip_shared.manifest import ManifestEntry

#: Admissions are waits on S3 (a ranged GET each): this many at once keeps a batch's wall time, which
#: Lambda bills, near one GET's latency per 32 objects on a function with a fraction of a vCPU.
ADMISSION_THREADS = 32


@dataclass(frozen=True)
class ObjectRef:
    """An object as a notification (or a listing) names it; the key is already URL-decoded."""

    bucket: str
    key: str
    #: The version the notification announced; None when the bucket is not versioned (or a listing).
    version_id: str | None = None

    @property
    def url(self) -> str:
        return keys.s3_url(self.bucket, self.key)


@dataclass(frozen=True)
class Rejection:
    ref: ObjectRef
    code: ErrorCode
    message: str
    mime_type: str | None = None
    size: int | None = None
    etag: str | None = None


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    #: A newer version replaced the announced one; the newer version's own notification covers it.
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Admission:
    """What admitting one object decided: an entry for a manifest, or a rejection, or neither."""

    ref: ObjectRef
    verdict: Verdict
    entry: ManifestEntry | None = None
    rejection: Rejection | None = None


def _total_size(content_range: str) -> int:
    """`bytes 0-261/12345` -> 12345."""
    return int(content_range.rsplit("/", 1)[1])


def admit(s3: Any, ref: ObjectRef, max_object_bytes: int) -> Admission:
    """Decide from one ranged GET whether the worker may embed `ref`'s current version."""
    try:
        response = s3.get_object(Bucket=ref.bucket, Key=ref.key, Range=f"bytes=0-{mime.SNIFF_BYTES - 1}")
    except Exception as exc:
        if aws.is_missing(exc):
            return _rejected(ref, ErrorCode.NOT_FOUND, "the object was deleted before it could be dispatched")
        if aws.error_code(exc) == "InvalidRange":  # S3's answer to a range of an empty object
            return _rejected(ref, ErrorCode.UNSUPPORTED_TYPE, "the object is empty", size=0)
        if refused := aws.refusal(exc):
            # Raised, the message would go round the dead-letter queue and every backfill forever.
            return _rejected(ref, *refused)
        raise
    version_id = response.get("VersionId")
    if ref.version_id is not None and version_id != ref.version_id:
        response["Body"].close()
        return Admission(ref, Verdict.SUPERSEDED)
    size = _total_size(response["ContentRange"]) if response.get("ContentRange") else int(response["ContentLength"])
    etag = keys.bare_etag(response["ETag"])
    if size > max_object_bytes:
        response["Body"].close()
        return _rejected(
            ref, ErrorCode.TOO_LARGE, f"{size} bytes exceeds the {max_object_bytes}-byte limit", size=size, etag=etag
        )
    detected = mime.sniff_mime(response["Body"].read())
    if not mime.is_accepted(detected):
        declared = response.get("ContentType", "unset")
        return _rejected(
            ref,
            ErrorCode.UNSUPPORTED_TYPE,
            f"content is {detected or 'not a recognised format'} (declared Content-Type: {declared})",
            mime_type=detected,
            size=size,
            etag=etag,
        )
    entry = ManifestEntry(bucket=ref.bucket, key=ref.key, size=size, etag=etag, mime_type=str(detected), version_id=version_id)
    return Admission(ref, Verdict.ACCEPTED, entry=entry)


def _rejected(ref: ObjectRef, code: ErrorCode, message: str, **found: Any) -> Admission:
    return Admission(ref, Verdict.REJECTED, rejection=Rejection(ref, code, message, **found))


def record_rejection(s3: Any, output_bucket: str, output_prefix: str, rejection: Rejection, chain_id: str) -> str:
    """Write the `document-rejected` CloudEvent for one object; returns its key."""
    ref = rejection.ref
    document = document_ref(ref.url, rejection.mime_type, rejection.size, rejection.etag)
    event = document_event(
        EventType.REJECTED, document, chain_id, component="dispatcher", error=(rejection.code, rejection.message)
    )
    key = keys.rejection_key(output_prefix, ref.bucket, ref.key)
    s3.put_object(Bucket=output_bucket, Key=key, Body=to_json(event), ContentType="application/cloudevents+json")
    return key
