"""The manifest: the list of validated input objects the dispatcher hands to one Batch job.

One JSON document per job. An array job of N children shares one manifest; child i embeds
entries [i * shardSize, (i + 1) * shardSize), so the children cover every entry exactly once
without the worker having to be told the array size (Batch does not pass it to children).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

SCHEMA_VERSION = 1


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
    schema_version: int = SCHEMA_VERSION
    manifest_id: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    shard_size: int = Field(ge=1)
    entries: tuple[ManifestEntry, ...]

    @property
    def shard_count(self) -> int:
        return max(1, math.ceil(len(self.entries) / self.shard_size))

    def shard(self, index: int | None) -> tuple[ManifestEntry, ...]:
        """The entries one job child owns; `None` (not an array job) owns them all."""
        if index is None:
            return self.entries
        if not 0 <= index < self.shard_count:
            raise ManifestError(
                f"manifest {self.manifest_id} has {self.shard_count} shard(s) of {self.shard_size}; "
                f"array index {index} is outside it"
            )
        return self.entries[index * self.shard_size : (index + 1) * self.shard_size]

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "manifest") -> "Manifest":
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            raise ManifestError(f"{source} is not a valid manifest: {exc}") from exc
        if manifest.schema_version != SCHEMA_VERSION:
            raise ManifestError(
                f"{source} has schemaVersion {manifest.schema_version}; this worker reads version {SCHEMA_VERSION}"
            )
        return manifest
