"""Reading inputs: this child's manifest, then each listed object's bytes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from clip_shared import aws, keys
from clip_shared.events import DocumentError, ErrorCode
from clip_shared.manifest import Manifest, ManifestEntry, ManifestError


class TransientError(Exception):
    """Reading an object failed in a way a later attempt may not: the client's own retries ran out."""


@dataclass(frozen=True)
class ObjectVersion:
    """Which version of an object was read: its ETag, and when S3 says that version was written."""

    etag: str
    #: Orders two versions of one key for the vector store (a late shard of an older upload must not
    #: replace a newer one); S3 keeps it to the second. None where the source does not say.
    last_modified: datetime | None = None


def load_manifest(uri: str, shard_index: int, s3: Any) -> Manifest:
    """Child `shard_index`'s manifest from under `uri`: an s3:// prefix or a local folder (MANIFEST_URI)."""
    name = keys.manifest_shard_name(shard_index)
    location = f"{uri.rstrip('/')}/{name}"
    try:
        if uri.startswith("s3://"):
            bucket, key = keys.parse_s3_url(location)
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        else:
            body = (Path(uri) / name).read_bytes()
    except (ClientError, BotoCoreError, OSError, ValueError) as exc:
        raise ManifestError(f"cannot read the manifest {location}: {exc}") from exc
    manifest = Manifest.from_json(body, source=location)
    if manifest.shard_index != shard_index:
        raise ManifestError(f"{location} is shard {manifest.shard_index} of its job, not {shard_index}")
    return manifest


def fetch(entry: ManifestEntry, s3: Any, max_bytes: int) -> tuple[bytes, ObjectVersion]:
    """The object's bytes and the version actually read.

    Without a version id the current object is read, even if it changed since dispatch: its
    newer ETag goes into the outputs, so the job dispatched for the newer upload skips it.
    """
    if entry.size > max_bytes:
        raise DocumentError(
            ErrorCode.TOO_LARGE, f"{entry.url} is {entry.size} bytes, over the {max_bytes}-byte limit (MAX_OBJECT_BYTES)"
        )
    request = {"Bucket": entry.bucket, "Key": entry.key}
    if entry.version_id:
        request["VersionId"] = entry.version_id
    try:
        response = s3.get_object(**request)
        length = response["ContentLength"]
        if length > max_bytes:
            response["Body"].close()
            raise DocumentError(
                ErrorCode.TOO_LARGE, f"{entry.url} is {length} bytes, over the {max_bytes}-byte limit (MAX_OBJECT_BYTES)"
            )
        return response["Body"].read(), ObjectVersion(keys.bare_etag(response["ETag"]), response.get("LastModified"))
    except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as exc:
        if aws.is_missing(exc):
            version = f" version {entry.version_id}" if entry.version_id else ""
            raise DocumentError(ErrorCode.NOT_FOUND, f"{entry.url}{version} no longer exists ({aws.error_code(exc)})") from exc
        if refused := aws.refusal(exc):
            # Archived, or its key taken away, after the dispatcher read its first bytes.
            code, reason = refused
            raise DocumentError(code, f"could not download {entry.url}: {reason}") from exc
        if aws.is_transient(exc):
            raise TransientError(f"could not download {entry.url}: {type(exc).__name__}: {exc}") from exc
        raise DocumentError(ErrorCode.DOWNLOAD_FAILED, f"could not download {entry.url}: {exc}") from exc
