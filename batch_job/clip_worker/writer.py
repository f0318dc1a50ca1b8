"""Writing outputs: per image a vector and a CloudEvents document, per job child a Parquet shard.

The vector is always written before its `document-created` event, so an event that says
"created" for an ETag proves the vector is there: that is what lets a re-run skip the image.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import ClientError

from clip_shared import keys
from clip_shared.events import (
    DocumentError,
    EventType,
    Keywords,
    document_event,
    document_ref,
    embedding_metadata,
    to_json,
)
from clip_shared.manifest import ManifestEntry

if TYPE_CHECKING:  # the model module imports torch, which readers of outputs do not need
    from clip_worker.model import ClipModel

COMPONENT = "worker"
# S3 user metadata on each event document: enough to decide "already done" with one HEAD.
_ETAG_META = "source-etag"
_TYPE_META = "event-type"


@dataclass(frozen=True)
class Row:
    """One embedded image, as it goes into the Parquet shard."""

    entry: ManifestEntry
    etag: str
    vector: np.ndarray


def shard_schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            ("url", pa.string()),
            ("bucket", pa.string()),
            ("key", pa.string()),
            ("version_id", pa.string()),
            ("etag", pa.string()),
            ("model", pa.string()),
            ("pretrained", pa.string()),
            ("vector", pa.list_(pa.float32(), dimensions)),
        ]
    )


def embedded_etag(s3: Any, bucket: str, prefix: str, model_id: str, source_bucket: str, key: str) -> str | None:
    """The source ETag this model last embedded for an object, from one HEAD; None if never."""
    try:
        head = s3.head_object(Bucket=bucket, Key=keys.event_key(prefix, model_id, source_bucket, key))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    meta = head.get("Metadata", {})
    return meta.get(_ETAG_META) if meta.get(_TYPE_META) == EventType.CREATED else None


class OutputWriter:
    def __init__(self, s3: Any, bucket: str, prefix: str, model: "ClipModel", chain_id: str) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._prefix = prefix
        self._model_name = model.name
        self._pretrained = model.pretrained
        self._model_id = model.id
        self._dimensions = model.dimensions
        self._chain_id = chain_id

    def vector_key(self, entry: ManifestEntry) -> str:
        return keys.vector_key(self._prefix, self._model_id, entry.bucket, entry.key)

    def event_key(self, entry: ManifestEntry) -> str:
        return keys.event_key(self._prefix, self._model_id, entry.bucket, entry.key)

    def finished(self, entry: ManifestEntry) -> np.ndarray | None:
        """The stored vector when this object's current ETag was already embedded by this model."""
        if embedded_etag(self._s3, self._bucket, self._prefix, self._model_id, entry.bucket, entry.key) != entry.etag:
            return None
        body = self._s3.get_object(Bucket=self._bucket, Key=self.vector_key(entry))["Body"].read()
        return np.asarray(json.loads(body), dtype=np.float32)

    def created(self, entry: ManifestEntry, etag: str, vector: np.ndarray, keywords: Keywords | None = None) -> None:
        vector_key = self.vector_key(entry)
        self._s3.put_object(
            Bucket=self._bucket,
            Key=vector_key,
            Body=json.dumps(vector.tolist()).encode(),
            ContentType="application/json",
        )
        metadata = embedding_metadata(
            keys.s3_url(self._bucket, vector_key), self._model_name, self._pretrained, self._dimensions, keywords
        )
        self._put_event(EventType.CREATED, entry, etag, metadata=metadata)

    def failed(self, entry: ManifestEntry, error: DocumentError, etag: str | None = None) -> None:
        self._put_event(EventType.FAILED, entry, etag or entry.etag, error=error)

    def _put_event(
        self,
        event_type: EventType,
        entry: ManifestEntry,
        etag: str,
        metadata: dict[str, Any] | None = None,
        error: DocumentError | None = None,
    ) -> None:
        event = document_event(
            event_type,
            document_ref(entry.url, entry.mime_type, entry.size, etag),
            chain_id=self._chain_id,
            component=COMPONENT,
            metadata=metadata,
            error=(error.code, error.message) if error else None,
        )
        self._s3.put_object(
            Bucket=self._bucket,
            Key=self.event_key(entry),
            Body=to_json(event),
            ContentType="application/cloudevents+json",
            Metadata={_ETAG_META: etag, _TYPE_META: str(event_type)},
        )

    def shard(self, manifest_id: str, shard_index: int, rows: list[Row]) -> str:
        """Write the job child's Parquet shard and return its s3:// URL."""
        schema = shard_schema(self._dimensions)
        vectors = np.stack([row.vector for row in rows]).astype(np.float32) if rows else np.zeros((0, self._dimensions), np.float32)
        table = pa.table(
            {
                "url": [row.entry.url for row in rows],
                "bucket": [row.entry.bucket for row in rows],
                "key": [row.entry.key for row in rows],
                "version_id": [row.entry.version_id for row in rows],
                "etag": [row.etag for row in rows],
                "model": [self._model_name] * len(rows),
                "pretrained": [self._pretrained] * len(rows),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self._dimensions),
            },
            schema=schema,
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        key = keys.parquet_key(self._prefix, self._model_id, manifest_id, shard_index)
        self._s3.put_object(Bucket=self._bucket, Key=key, Body=buffer.getvalue(), ContentType="application/vnd.apache.parquet")
        return keys.s3_url(self._bucket, key)
