"""Writing outputs: per job child, a Parquet shard of vectors and a CloudEvents batch of outcomes.

Both are rewritten whole at each checkpoint (every CHECKPOINT_SECONDS, at the end, and on SIGTERM)
under keys fixed by the manifest and the child, so a child costs two PUTs however many images it
holds, and an attempt that follows a crash or a Spot reclaim reads them back (`resume`) and skips
what they hold. The batch is a JSON array of CloudEvents: the CloudEvents JSON batch format
(`application/cloudevents-batch+json`), which every CloudEvents SDK's JSON format can read element
by element, and which stays one document a consumer fetches whole (a child's batch is a few MB).
The batch's S3 metadata counts what it holds (keys.EVENTS_OUTCOMES_METADATA), so that `status`
counts a child's outcomes with a HEAD instead of reading its events.

With per-object outputs on (PER_OBJECT_OUTPUTS), every image also gets its own vector and CloudEvent
as soon as it is embedded, the vector first, so that an event proves its vector is there.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_shared import aws, keys
from clip_shared.events import (
    BATCH_CONTENT_TYPE,
    SCHEMA_VERSION,
    BatchCounts,
    DocumentError,
    EventType,
    Keywords,
    document_event,
    document_ref,
    document_url,
    embedding_metadata,
    from_json_batch,
    to_json,
    to_json_batch,
)
from clip_shared.manifest import ManifestEntry
from clip_worker.reader import ObjectVersion

if TYPE_CHECKING:  # the model module imports torch, which readers of outputs do not need
    from clip_worker.model import ClipModel

COMPONENT = "worker"


@dataclass(frozen=True)
class Row:
    """One embedded image, as it goes into the Parquet shard."""

    entry: ManifestEntry
    version: ObjectVersion
    vector: np.ndarray


def shard_schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            ("url", pa.string()),
            ("bucket", pa.string()),
            ("key", pa.string()),
            ("version_id", pa.string()),
            ("etag", pa.string()),
            #: When the version embedded was written (S3's LastModified): the store keeps the newest.
            ("last_modified", pa.timestamp("ms", tz="UTC")),
            ("model", pa.string()),
            ("pretrained", pa.string()),
            ("vector", pa.list_(pa.float32(), dimensions)),
        ]
    )


def identity(entry: ManifestEntry) -> tuple[str, str]:
    """One object version: the same key uploaded twice may sit twice in one manifest."""
    return entry.url, entry.version_id or entry.etag


@dataclass
class Resumed:
    """What earlier attempts of this child finished: vectors of embedded images, and recorded failures."""

    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    failed: set[tuple[str, str]] = field(default_factory=set)

    def __contains__(self, entry: ManifestEntry) -> bool:
        key = identity(entry)
        row = self.rows.get(key)
        return (row is not None and row.version.etag == entry.etag) or key in self.failed


class OutputWriter:
    """Collects a child's outcomes in memory and writes them at checkpoints (and, per object, as they come).

    Called from one thread; per-object writes run on `pool`, and `flush` says which of them failed.
    """

    def __init__(
        self,
        s3: Any,
        bucket: str,
        prefix: str,
        model: ClipModel,
        job_id: str | None,
        manifest_id: str,
        shard_index: int,
        per_object_pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._prefix = prefix
        self._model_name = model.name
        self._pretrained = model.pretrained
        self._model_id = model.id
        self._dimensions = model.dimensions
        self._job_id = job_id
        self._manifest_id = manifest_id
        self._pool = per_object_pool
        self._per_object = per_object_pool is not None
        self._writes: list[tuple[ManifestEntry, Future[None]]] = []
        self.shard_key = keys.parquet_key(prefix, model.id, manifest_id, shard_index)
        self.events_key = keys.events_key(prefix, model.id, manifest_id, shard_index)
        self._rows: dict[tuple[str, str], Row] = {}
        self._events: dict[tuple[str, str], bytes] = {}
        #: identity -> (url, error code) of each object that failed.
        self._failed: dict[tuple[str, str], tuple[str, str]] = {}

    @property
    def shard_url(self) -> str:
        return keys.s3_url(self._bucket, self.shard_key)

    def resume(self, entries: tuple[ManifestEntry, ...]) -> Resumed:
        """Reads back this child's last checkpoint (nothing on a first attempt) and keeps it for the next."""
        try:
            body = self._s3.get_object(Bucket=self._bucket, Key=self.events_key)["Body"].read()
        except Exception as exc:
            if aws.is_missing(exc):
                return Resumed()
            raise
        by_url = {entry.url: entry for entry in entries}
        resumed = Resumed()
        created: dict[tuple[str, str], bytes] = {}
        for event in from_json_batch(body):
            entry = by_url.get(document_url(event))
            if entry is None:
                continue
            if event.get_type() == EventType.FAILED:
                resumed.failed.add(identity(entry))
                self._events[identity(entry)] = to_json(event)
                data = event.get_data()
                assert isinstance(data, dict)  # our events' data is always a JSON object
                self._failed[identity(entry)] = (entry.url, data["error"]["code"])
            else:
                created[identity(entry)] = to_json(event)
        if created:
            try:
                shard = self._s3.get_object(Bucket=self._bucket, Key=self.shard_key)["Body"].read()
            except Exception as exc:
                if aws.is_missing(exc):  # vectors gone: those images are embedded again
                    return resumed
                raise
            table = pq.read_table(io.BytesIO(shard))
            vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, self._dimensions)
            versions = [
                ObjectVersion(etag, when)
                for etag, when in zip(table.column("etag").to_pylist(), table.column("last_modified").to_pylist(), strict=True)
            ]
            for url, version, vector in zip(table.column("url").to_pylist(), versions, vectors, strict=True):
                entry = by_url.get(url)
                if entry is not None and identity(entry) in created:
                    resumed.rows[identity(entry)] = self._rows[identity(entry)] = Row(entry, version, vector)
                    self._events[identity(entry)] = created[identity(entry)]
        return resumed

    def created(self, entry: ManifestEntry, version: ObjectVersion, vector: np.ndarray, keywords: Keywords | None = None) -> None:
        # Where the vector is: its own document, or this child's shard (the row whose url is the document's).
        vectors_url = keys.s3_url(self._bucket, self._vector_key(entry)) if self._per_object else self.shard_url
        metadata = embedding_metadata(vectors_url, self._model_name, self._pretrained, self._dimensions, keywords)
        event = to_json(self._event(EventType.CREATED, entry, version.etag, metadata=metadata))
        if self._per_object:
            self._submit(entry, self._put_vector_then_document, entry, vector, event)
        self._rows[identity(entry)] = Row(entry, version, vector)
        self._events[identity(entry)] = event

    def failed(self, entry: ManifestEntry, error: DocumentError) -> None:
        event = to_json(self._event(EventType.FAILED, entry, entry.etag, error=error))
        if self._per_object:
            self._submit(entry, self._put_document, entry, event)
        self._events[identity(entry)] = event
        self._failed[identity(entry)] = (entry.url, error.code)

    def recorded(self, entry: ManifestEntry) -> bool:
        """Whether `entry` has its outcome here (embedded or failed, now or by an earlier attempt)."""
        return identity(entry) in self._events

    def flush(self) -> list[tuple[ManifestEntry, BaseException]]:
        """Waits for the per-object writes; returns those that failed."""
        failed = [(entry, exc) for entry, future in self._writes if (exc := future.exception()) is not None]
        self._writes = []
        return failed

    def checkpoint(self, entries: tuple[ManifestEntry, ...]) -> str:
        """Writes the shard, then the events batch with its counts, in manifest order; returns the shard's s3:// URL.

        The shard goes first, so a batch that says "created" always has its vector in the shard.
        """
        order = list(dict.fromkeys(identity(entry) for entry in entries))
        rows = [self._rows[key] for key in order if key in self._rows]
        failed = [self._failed[key] for key in order if key in self._failed]
        self._s3.put_object(
            Bucket=self._bucket,
            Key=self.shard_key,
            Body=self._parquet(rows, [url for url, _ in failed]),
            ContentType="application/vnd.apache.parquet",
        )
        events = [self._events[key] for key in order if key in self._events]
        counts = BatchCounts(len(events) - len(failed), Counter(code for _, code in failed))
        self._s3.put_object(
            Bucket=self._bucket,
            Key=self.events_key,
            Body=to_json_batch(events),
            ContentType=BATCH_CONTENT_TYPE,
            Metadata=counts.to_metadata(),
        )
        return self.shard_url

    def _vector_key(self, entry: ManifestEntry) -> str:
        return keys.vector_key(self._prefix, self._model_id, entry.bucket, entry.key)

    def _submit(self, entry: ManifestEntry, write: Callable[..., None], *args: Any) -> None:
        assert self._pool is not None
        self._writes.append((entry, self._pool.submit(write, *args)))

    def _put_vector_then_document(self, entry: ManifestEntry, vector: np.ndarray, event: bytes) -> None:
        self._s3.put_object(
            Bucket=self._bucket,
            Key=self._vector_key(entry),
            Body=json.dumps(vector.tolist()).encode(),
            ContentType="application/json",
        )
        self._put_document(entry, event)

    def _put_document(self, entry: ManifestEntry, event: bytes) -> None:
        self._s3.put_object(
            Bucket=self._bucket,
            Key=keys.document_key(self._prefix, self._model_id, entry.bucket, entry.key),
            Body=event,
            ContentType="application/cloudevents+json",
        )

    def _event(
        self,
        event_type: EventType,
        entry: ManifestEntry,
        etag: str,
        metadata: dict[str, Any] | None = None,
        error: DocumentError | None = None,
    ) -> Any:
        return document_event(
            event_type,
            document_ref(entry.url, entry.mime_type, entry.size, etag),
            chain_id=self._manifest_id,
            component=COMPONENT,
            metadata=metadata,
            error=(error.code, error.message) if error else None,
            job_id=self._job_id,
        )

    def _parquet(self, rows: list[Row], failed: list[str]) -> bytes:
        """The shard: one row per embedded image, and in its metadata the urls of those that failed,
        whose older vectors the vector store's indexer removes (keys.SHARD_FAILED_METADATA)."""
        vectors = (
            np.stack([row.vector for row in rows]).astype(np.float32) if rows else np.zeros((0, self._dimensions), np.float32)
        )
        table = pa.table(
            {
                "url": [row.entry.url for row in rows],
                "bucket": [row.entry.bucket for row in rows],
                "key": [row.entry.key for row in rows],
                "version_id": [row.entry.version_id for row in rows],
                "etag": [row.version.etag for row in rows],
                "last_modified": [row.version.last_modified for row in rows],
                "model": [self._model_name] * len(rows),
                "pretrained": [self._pretrained] * len(rows),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self._dimensions),
            },
            schema=shard_schema(self._dimensions).with_metadata(
                {keys.SHARD_FAILED_METADATA: json.dumps(sorted(set(failed))), keys.SHARD_SCHEMA_METADATA: SCHEMA_VERSION}
            ),
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        return buffer.getvalue()
