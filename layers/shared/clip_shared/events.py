"""The CloudEvents 1.0 documents that record every object's fate.

One shape for all three outcomes (the shape Project Lakechain's CLIP processor emits):
`document-created` (embedded), `document-failed` (the worker could not embed it) and
`document-rejected` (the dispatcher refused it). Built and serialised with the official
`cloudevents` SDK, so every document is valid CloudEvents by construction.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from clip_shared import keys

SOURCE = "urn:clip-embedding-pipeline"
#: The version of the output contract (docs/outputs.md), in every event's `dataschema` and every
#: Parquet shard's metadata (keys.SHARD_SCHEMA_METADATA). It changes only when a field is removed or
#: changes meaning; new fields may appear within a version.
SCHEMA_VERSION = "1"
DATASCHEMA = f"{SOURCE}:outputs:v{SCHEMA_VERSION}"
#: The CloudEvents JSON batch format: a JSON array of structured-mode events.
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
_FORMAT = JSONFormat()


class EventType(StrEnum):
    CREATED = "document-created"
    FAILED = "document-failed"
    REJECTED = "document-rejected"


class ErrorCode(StrEnum):
    """Stable codes users can filter on; messages may change, codes do not."""

    NOT_FOUND = "object-not-found"
    TOO_LARGE = "object-too-large"
    UNSUPPORTED_TYPE = "unsupported-type"
    DOWNLOAD_FAILED = "download-failed"
    #: S3 holds the object but will not serve it, whoever asks again: its state (an archive storage
    #: class, not restored), its encryption (a customer key, or a KMS key this role cannot use) or a
    #: policy. Fixed by the owner (restore, re-upload, grant), then `clip-pipeline backfill`.
    OBJECT_ARCHIVED = "object-archived"
    CUSTOMER_KEY_REQUIRED = "customer-key-required"
    KMS_KEY_UNUSABLE = "kms-key-unusable"
    ACCESS_DENIED = "access-denied"
    CORRUPT_IMAGE = "corrupt-image"
    TOO_MANY_PIXELS = "too-many-pixels"
    #: Preparing the object killed the process that did it (a crash or an out-of-memory kill), in
    #: isolation, after a job attempt died with it in flight: it would kill every attempt.
    CRASHES_WORKER = "crashes-worker"
    #: Decoding it went over the budget of one object (CPU time, memory or wall time; the message
    #: names the limit and its setting): the same bytes would again, so `retry` leaves it unless asked.
    TOO_COSTLY = "too-costly"
    #: The job ran out of time (JobTimeoutSeconds) on its last attempt before this object was prepared.
    TIMED_OUT = "timed-out"
    #: A bug or an unforeseen condition; the message carries the exception so it can be reported.
    INTERNAL_ERROR = "internal-error"


class DocumentError(Exception):
    """Why one object cannot be embedded; becomes its failed or rejected event, never stops the others."""

    def __init__(self, code: ErrorCode, message: str, over: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: For a decoding budget's refusal, what the object ran out of: `memory`, `cpu` or `wall` (the
        #: machine's memory when the kernel killed its process). A machine with more may yet afford it.
        self.over = over

    def __reduce__(self) -> tuple[type[DocumentError], tuple[ErrorCode, str, str | None]]:
        # Raised in the decoding helper processes too (clip_worker.sandbox), and pickled back from them.
        return DocumentError, (self.code, self.message, self.over)


def document_ref(url: str, mime_type: str | None, size: int | None, etag: str | None) -> dict[str, Any]:
    return {"url": url, "type": mime_type, "size": size, "etag": etag}


def document_event(
    event_type: EventType,
    document: dict[str, Any],
    chain_id: str,
    component: str,
    metadata: dict[str, Any] | None = None,
    error: tuple[ErrorCode, str] | None = None,
    job_id: str | None = None,
) -> CloudEvent:
    """One object's event. `component` (dispatcher, worker) completes the event's `source`.

    `chain_id` is the manifest id, whatever the outcome: the dispatcher's batch that the object was
    admitted to or rejected from, also the folder of its job's outputs; `job_id`, the Batch job that
    embedded it or failed to, where there was one.
    """
    data: dict[str, Any] = {
        "chainId": chain_id,
        "source": document,
        "document": document,
        "metadata": metadata or {},
        "callStack": [f"{SOURCE}:{component}"],
    }
    if error is not None:
        code, message = error
        data["error"] = {"code": str(code), "message": message}
    if job_id is not None:
        data["jobId"] = job_id
    attributes = {
        "type": str(event_type),
        "source": f"{SOURCE}:{component}",
        "subject": document["url"],
        "datacontenttype": "application/json",
        "dataschema": DATASCHEMA,
    }
    return CloudEvent(attributes, data)


class ScoredLabel(Protocol):
    """One label of a set as it scores against one image (the worker's clip_worker.labels.Label)."""

    @property
    def label(self) -> str: ...

    @property
    def score(self) -> float: ...

    @property
    def probability(self) -> float: ...


@dataclass(frozen=True)
class Keywords:
    """An image's zero-shot keywords: the labels of a set nearest to it."""

    #: Best first.
    ranked: Sequence[ScoredLabel]
    #: What each label was embedded as, `{}` standing for the label.
    prompt: str
    #: How many labels the set holds: the probabilities are a softmax over all of them.
    label_count: int


def embedding_metadata(
    vectors_url: str, model: str, pretrained: str, dimensions: int, keywords: Keywords | None = None
) -> dict[str, Any]:
    """A created event's `data.metadata`. With keywords: Lakechain's `keywords` (the labels, best
    first), and under `properties.attrs` each one's scores and how they were computed."""
    embeddings = {"vectors": vectors_url, "model": model, "pretrained": pretrained, "dimensions": dimensions}
    attrs: dict[str, Any] = {"embeddings": embeddings}
    metadata: dict[str, Any] = {"properties": {"kind": "image", "attrs": attrs}}
    if keywords is not None:
        metadata["keywords"] = [item.label for item in keywords.ranked]
        attrs["keywords"] = [
            {"label": item.label, "score": round(item.score, 6), "probability": round(item.probability, 6)}
            for item in keywords.ranked
        ]
        attrs["zeroShot"] = {"prompt": keywords.prompt, "labelCount": keywords.label_count}
    return metadata


def to_json(event: BaseCloudEvent) -> bytes:
    return _FORMAT.write(event)


def from_json(data: bytes | str) -> BaseCloudEvent:
    return _FORMAT.read(None, data)


def document_url(event: BaseCloudEvent) -> str:
    """The url of the object an event of ours is about (its data is always a JSON object)."""
    data = event.get_data()
    assert isinstance(data, dict)
    return str(data["document"]["url"])


def to_json_batch(events: Sequence[bytes]) -> bytes:
    """Events already serialised by `to_json`, as one CloudEvents JSON batch document."""
    return b"[" + b",".join(events) + b"]"


def from_json_batch(data: bytes | str) -> list[BaseCloudEvent]:
    """Each event of a CloudEvents JSON batch document, read (and validated) by the SDK."""
    return [_FORMAT.read(None, json.dumps(item)) for item in json.loads(data)]


@dataclass(frozen=True)
class BatchCounts:
    """What one events batch holds, by outcome: the batch's S3 metadata (keys.EVENTS_OUTCOMES_METADATA)."""

    created: int = 0
    #: Failures by error code.
    failed: Mapping[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def to_metadata(self) -> dict[str, str]:
        counts = {"created": self.created, "failed": dict(sorted(self.failed.items()))}
        return {keys.EVENTS_OUTCOMES_METADATA: json.dumps(counts, separators=(",", ":"))}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> BatchCounts | None:
        """None for a batch written without it (before the metadata existed), or with one that is not
        ours (a copy that replaced it): count its events instead."""
        try:
            counts = json.loads(metadata[keys.EVENTS_OUTCOMES_METADATA])
            return cls(int(counts["created"]), {str(code): int(n) for code, n in counts["failed"].items()})
        except (KeyError, ValueError, TypeError, AttributeError):
            return None

    @classmethod
    def of(cls, events: Iterable[Mapping[str, Any]]) -> BatchCounts:
        """Counted from the events themselves (JSON objects as a batch holds them)."""
        created, failed = 0, Counter[str]()
        for event in events:
            if event["type"] == EventType.FAILED:
                failed[event["data"]["error"]["code"]] += 1
            else:
                created += 1
        return cls(created, dict(failed))
