"""How far a job child has got: counts, rate, ETA and where the time goes, logged at an interval.

Stage times are seconds spent in each stage summed over the threads that run it (download and
decode on the prepare threads, embed on the main thread, write on the write threads), so the
bottleneck shows in CloudWatch: the stage whose seconds approach elapsed x its threads binds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from clip_worker.log import logger

STAGES = ("download", "decode", "embed", "write")


@dataclass
class Progress:
    total: int
    interval_s: float
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    #: Objects S3 would not serve, left without a record to the job's next attempt.
    deferred: int = 0
    write_errors: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_log: float = field(default_factory=time.monotonic)
    _stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        return self.embedded + self.skipped + self.failed

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Adds the time the block takes to `stage`; safe from any thread."""
        started = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._stage_s[stage] += time.monotonic() - started

    def fields(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        remaining = self.total - self.done
        with self._lock:
            stages = {f"{stage}_s": round(seconds, 2) for stage, seconds in self._stage_s.items()}
        return {
            "total": self.total,
            "done": self.done,
            "embedded": self.embedded,
            "skipped": self.skipped,
            "failed": self.failed,
            "deferred": self.deferred,
            "write_errors": self.write_errors,
            "elapsed_s": round(elapsed, 2),
            "images_per_s": round(rate, 2),
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
            **stages,
        }

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            logger.info("progress", extra=self.fields())
