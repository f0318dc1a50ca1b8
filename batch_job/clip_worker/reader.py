"""Reading inputs: the manifest, then each listed object's bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from clip_shared.events import DocumentError, ErrorCode
from clip_shared.keys import bare_etag, parse_s3_url
from clip_shared.manifest import Manifest, ManifestEntry, ManifestError

_MISSING = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}
#: Answers that say "not now" rather than "never": S3 throttling and its own failures.
_TRANSIENT = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
              "RequestLimitExceeded", "500", "502", "503", "504"}


class TransientError(Exception):
    """Reading an object failed in a way a later attempt may not: the client's own retries ran out."""


def is_transient(exc: Exception) -> bool:
    """Throttling, S3's 5xx and network failures (BotoCoreError covers connections, timeouts, cut streams)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) in _TRANSIENT
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))


def load_manifest(uri: str, s3: Any) -> Manifest:
    """A manifest from `s3://bucket/key` or a local file path."""
    try:
        if uri.startswith("s3://"):
            bucket, key = parse_s3_url(uri)
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        else:
            body = Path(uri).read_bytes()
    except (ClientError, OSError, ValueError) as exc:
        raise ManifestError(f"cannot read the manifest {uri}: {exc}") from exc
    return Manifest.from_json(body, source=uri)


def fetch(entry: ManifestEntry, s3: Any, max_bytes: int) -> tuple[bytes, str]:
    """The object's bytes and the ETag of the version actually read.

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
        return response["Body"].read(), bare_etag(response["ETag"])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _MISSING:
            version = f" version {entry.version_id}" if entry.version_id else ""
            raise DocumentError(ErrorCode.NOT_FOUND, f"{entry.url}{version} no longer exists ({code})") from exc
        if is_transient(exc):
            raise TransientError(f"could not download {entry.url}: {exc}") from exc
        raise DocumentError(ErrorCode.DOWNLOAD_FAILED, f"could not download {entry.url}: {exc}") from exc
    except (BotoCoreError, ConnectionError, TimeoutError) as exc:
        raise TransientError(f"could not download {entry.url}: {type(exc).__name__}: {exc}") from exc
