"""S3's event notification for a created object, for code that must send the one S3 did not.

The indexer sends the dispatcher this notification when a removal uncovers an older version (S3
sends no ObjectCreated for it); benchmarks build the dispatcher's input with it. It has every field
S3 sends, so the dispatcher's parser (Powertools' S3Model) takes it like any other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus


def object_created(
    bucket: str, key: str, size: int, etag: str, version_id: str | None, *, sender: str, region: str = "us-east-1"
) -> dict[str, Any]:
    """One `ObjectCreated:Put` record; `sender` names who sent it (its configurationId and principals)."""
    announced: dict[str, Any] = {"key": quote_plus(key), "size": size, "eTag": etag, "sequencer": "0"}
    if version_id:
        announced["versionId"] = version_id
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": datetime.now(UTC).isoformat(),
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": sender},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": sender, "x-amz-id-2": sender},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": sender,
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": sender}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": announced,
        },
    }
