"""Progress of long commands (local over thousands of photos, backfill over millions of keys).

A live rich display on the terminal (stderr), or, with --json, one JSON line per update on stderr
(at most one a second per counter), so scripts read progress and stdout keeps the final document.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_JSON_INTERVAL_S = 1.0


@dataclass
class _Counter:
    total: int | None
    started: float = field(default_factory=time.monotonic)
    completed: int = 0
    emitted_at: float = 0.0


class Reporter:
    def __init__(self, console: Console, json_lines: bool) -> None:
        self._json = json_lines
        self._counters: dict[str, _Counter] = {}
        self._tasks: dict[str, TaskID] = {}
        self._display = (
            None
            if json_lines
            else Progress(
                TextColumn("{task.description:<12}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
        )

    def start(self, name: str, total: int | None = None) -> None:
        self._counters[name] = _Counter(total)
        if self._display is not None:
            self._tasks[name] = self._display.add_task(name, total=total, rate="")

    def update(self, name: str, completed: int, total: int | None = None) -> None:
        counter = self._counters[name]
        counter.completed = completed
        counter.total = total if total is not None else counter.total
        elapsed = time.monotonic() - counter.started
        rate = completed / elapsed if elapsed > 0 else 0.0
        if self._display is not None:
            self._display.update(self._tasks[name], completed=completed, total=counter.total, rate=f"{rate:,.1f}/s")
            return
        now = time.monotonic()
        if now - counter.emitted_at >= _JSON_INTERVAL_S or completed == counter.total:
            counter.emitted_at = now
            remaining = (counter.total - completed) / rate if counter.total is not None and rate > 0 else None
            line: dict[str, Any] = {
                "progress": name,
                "completed": completed,
                "total": counter.total,
                "per_s": round(rate, 2),
                "eta_s": round(remaining, 1) if remaining is not None else None,
            }
            print(json.dumps(line), file=sys.stderr, flush=True)

    @contextmanager
    def shown(self) -> Iterator[Reporter]:
        if self._display is None:
            yield self
            return
        with self._display:
            yield self
