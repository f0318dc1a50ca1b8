"""What a job child has in flight, kept in S3, so the attempt after a crash knows whom to suspect.

An object that kills the worker (a decoder crash, an out-of-memory kill) leaves no record of its
own: the process is gone. So the child writes, ahead of its work, the range of shard positions it
may be holding: one small PUT per window of objects (about 528 images on a GPU), not per object,
and none for the first window, which an attempt that finds no journal assumes. A clean exit that
leaves work to a retry (75, 143) writes "exited"; a finished child writes nothing more.

When a later attempt finds the journal "running", or none at all, the last attempt died, and the
objects of the window it was in that are not finished are suspects: the new attempt prepares them
one at a time, in isolation, naming each in the journal before it starts. A suspect that kills its
isolated process fails alone (`crashes-worker`); one named alone when an attempt died is failed
without being touched again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clip_shared import aws


@dataclass(frozen=True)
class Recovery:
    """What the journal says about the attempt before this one."""

    #: The last attempt died (no clean exit): isolate preparation in this one.
    crashed: bool = False
    #: Positions that may have killed it, to prepare one at a time.
    suspects: frozenset[int] = frozenset()
    #: The position that was alone in flight when it died: it is the cause.
    culprit: int | None = None
    #: Which attempt died.
    attempt: int | None = None


@dataclass
class Journal:
    s3: Any
    bucket: str
    key: str
    attempt: int
    #: How far ahead of the next submission each write reaches; the prepare window is a good size.
    slack: int
    suspects: list[int] = field(default_factory=list)
    _low: int = 0
    _high: int = 0
    _careful: int | None = None

    def __post_init__(self) -> None:
        # The first window is implied, never written: what an attempt that finds no journal suspects.
        self._high = self.slack

    def recover(self) -> Recovery:
        if self.attempt == 1:
            return Recovery()
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except Exception as exc:
            if aws.is_missing(exc):
                return Recovery(True, frozenset(range(self.slack)), None, self.attempt - 1)
            raise
        state = json.loads(body)
        if state.get("state") != "running":
            return Recovery()
        low, high = state["window"]
        culprit = state.get("careful")
        suspects = (set(state.get("suspects", ())) | set(range(low, high))) - {culprit}
        return Recovery(True, frozenset(suspects), culprit, state.get("attempt"))

    def start(self, suspects: list[int]) -> None:
        """This attempt begins with `suspects`; the first `careful` or `advance` writes it down."""
        self.suspects = list(suspects)

    def careful(self, position: int | None) -> None:
        """`position` alone is in flight now (None: the suspects are done)."""
        self._careful = position
        if position is None:
            self.suspects = []
        else:
            self.suspects = [suspect for suspect in self.suspects if suspect >= position]
        self._write("running")

    def advance(self, submitting: int, oldest_in_flight: Callable[[], int]) -> None:
        """Called before position `submitting` is handed to the prepare threads."""
        if self._low <= submitting < self._high:
            return
        self._low, self._high = oldest_in_flight(), submitting + self.slack
        self._write("running")

    def exited(self) -> None:
        """A clean exit that leaves work to a retry (interrupted, or S3 failing): nothing to suspect."""
        self._write("exited")

    def _write(self, state: str) -> None:
        document = {
            "state": state,
            "attempt": self.attempt,
            "window": [self._low, self._high],
            "careful": self._careful,
            "suspects": self.suspects,
            "updatedAt": datetime.now(UTC).isoformat(),
        }
        self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(document).encode(), ContentType="application/json")
