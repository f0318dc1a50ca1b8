"""The manifest: the validated input objects the dispatcher hands to one Batch job, one file per child.

A job of N array children has N manifest files under one prefix (`keys.manifest_prefix`), which
the job's MANIFEST_URI names; child i reads `shard-{i:05d}.json` and nothing else, so a child of a
ten-million-object backfill downloads its thousand entries, not the whole list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

SCHEMA_VERSION = 2
#: AWS Batch accepts array jobs of 2 to 10,000 children.
MAX_ARRAY_SIZE = 10_000


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the manifest and what is wrong."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")


class ManifestEntry(_Model):
    bucket: str = Field(min_length=3)
    key: str = Field(min_length=1)
    size: int = Field(ge=0)
    etag: str
    mime_type: str
    version_id: str | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class Manifest(_Model):
    """One job child's entries."""

    schema_version: int = SCHEMA_VERSION
    manifest_id: str = Field(min_length=1)
    shard_index: int = Field(default=0, ge=0)
    shard_count: int = Field(default=1, ge=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    entries: tuple[ManifestEntry, ...]

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "manifest") -> Manifest:
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            raise ManifestError(f"{source} is not a valid manifest: {exc}") from exc
        if manifest.schema_version != SCHEMA_VERSION:
            raise ManifestError(
                f"{source} has schemaVersion {manifest.schema_version}; this worker reads version {SCHEMA_VERSION}"
            )
        return manifest


def split(manifest_id: str, entries: Sequence[ManifestEntry], shard_size: int) -> list[Manifest]:
    """`entries` as the files of one job: child i embeds entries [i * shard_size, (i + 1) * shard_size)."""
    count = max(1, math.ceil(len(entries) / shard_size))
    if count > MAX_ARRAY_SIZE:
        raise ManifestError(
            f"{len(entries)} entries in shards of {shard_size} need {count} array children; "
            f"Batch allows {MAX_ARRAY_SIZE}: split the entries or raise the shard size"
        )
    created = datetime.now(UTC)
    return [
        Manifest(
            manifest_id=manifest_id,
            shard_index=index,
            shard_count=count,
            created_at=created,
            entries=tuple(entries[index * shard_size : (index + 1) * shard_size]),
        )
        for index in range(count)
    ]
