"""The store's refusals: a stable code to filter on, and a message that names what was wrong."""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    #: Vectors of another width than the store holds (a shard of another model, or a wrong query).
    DIMENSION_MISMATCH = "dimension-mismatch"
    #: A shard that cannot be read, or lacks the columns the worker writes.
    BAD_SHARD = "bad-shard"
    #: A shard S3 would not serve (missing, forbidden, throttled): a later try may read it.
    SHARD_UNAVAILABLE = "shard-unavailable"
    #: Rows of a shard whose objects S3 would not answer a HEAD for: left out until a later try.
    UNCHECKED = "object-unchecked"


class StoreError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[Code, str]]:
        # Errors cross process boundaries (a pool of appenders); keep the code when pickled.
        return StoreError, (self.code, self.message)
