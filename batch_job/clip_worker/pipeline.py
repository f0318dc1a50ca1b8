"""The flow of one job child: entries -> prepare threads -> batches through the model -> the writer.

Prepare threads download and decode ahead of the model, at most a window of entries in flight,
while the main thread embeds; every outcome reaches the writer from the main thread. The journal
hears where the window is (see journal.py), and suspects of a crash go through alone (`careful`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from clip_shared.manifest import ManifestEntry
from clip_worker.embed import Embedder, keywords
from clip_worker.journal import Journal
from clip_worker.labels import LabelSet
from clip_worker.log import logger
from clip_worker.prepare import Deferred, Failed, Prepared, Stage, ahead, prepare
from clip_worker.writer import OutputWriter


class Pipeline:
    def __init__(
        self,
        entries: tuple[ManifestEntry, ...],
        stage: Stage,
        embedder: Embedder,
        writer: OutputWriter,
        journal: Journal,
        label_set: LabelSet | None,
        batch_size: int,
        stop: threading.Event,
    ) -> None:
        self.entries = entries
        self.stage = stage
        self.embedder = embedder
        self.writer = writer
        self.journal = journal
        self.label_set = label_set
        self.batch_size = batch_size
        self.window = 2 * batch_size + stage.config.io_threads
        self.stop = stop
        self.progress = stage.progress
        self._position = {entry: index for index, entry in reversed(list(enumerate(entries)))}
        self._in_flight: Counter[ManifestEntry] = Counter()
        self._checkpointed = time.monotonic()

    def position(self, entry: ManifestEntry) -> int:
        return self._position[entry]

    def process(self, order: list[int], pool: ThreadPoolExecutor) -> list[Deferred]:
        """Prepare, embed and write the entries at `order`; returns those S3 failed transiently."""
        batch: list[Prepared] = []
        deferred: list[Deferred] = []
        for result in ahead(pool, self._submitted(order), lambda entry: prepare(entry, self.stage), self.window, self.stop):
            self._handle(result, batch, deferred)
            if len(batch) >= self.batch_size:
                self._embed(batch)
                batch = []
            self._tick()
        self._embed(batch, flush=True)
        return deferred

    def careful(self, suspects: list[int]) -> list[Deferred]:
        """Each suspect alone, named in the journal first: if it kills this attempt, the next one knows."""
        deferred: list[Deferred] = []
        for index in suspects:
            if self.stop.is_set():
                break
            self.journal.careful(index)
            self._in_flight[self.entries[index]] += 1
            batch: list[Prepared] = []
            self._handle(prepare(self.entries[index], self.stage), batch, deferred)
            self._embed(batch, flush=True)
            self._tick()
        self.journal.careful(None)
        return deferred

    def fail(self, result: Failed) -> None:
        logger.warning(
            "object failed", extra={"url": result.entry.url, "code": result.error.code, "reason": result.error.message}
        )
        self.writer.failed(result.entry, result.error)
        self.progress.failed += 1
        self._landed(result.entry)

    def checkpoint(self) -> str:
        with self.progress.timed("write"):
            self._checkpointed = time.monotonic()
            return self.writer.checkpoint(self.entries)

    def _submitted(self, order: list[int]) -> Iterator[ManifestEntry]:
        for index in order:
            self.journal.advance(index, functools.partial(self._oldest_in_flight, index))
            self._in_flight[self.entries[index]] += 1
            yield self.entries[index]

    def _oldest_in_flight(self, submitting: int) -> int:
        return min((self._position[entry] for entry in self._in_flight), default=submitting)

    def _handle(self, result: Prepared | Failed | Deferred, batch: list[Prepared], deferred: list[Deferred]) -> None:
        if isinstance(result, Failed):
            self.fail(result)
        elif isinstance(result, Deferred):
            deferred.append(result)
            self._landed(result.entry)
        else:
            batch.append(result)

    def _embed(self, batch: list[Prepared], flush: bool = False) -> None:
        with self.progress.timed("embed"):
            failures, done = self.embedder.submit(batch)
            if flush:
                done += self.embedder.finish()
        for failure in failures:
            self.fail(failure)
        vectors = [vector for _, vector in done]
        for (item, vector), words in zip(done, keywords(self.label_set, vectors, self.stage.config.keywords_top_k), strict=True):
            self.writer.created(item.entry, item.version, vector, words)
            self._landed(item.entry)
        self.progress.embedded += len(done)

    def _landed(self, entry: ManifestEntry) -> None:
        self._in_flight[entry] -= 1
        if self._in_flight[entry] <= 0:
            del self._in_flight[entry]

    def _tick(self) -> None:
        self.progress.tick()
        if time.monotonic() - self._checkpointed >= self.stage.config.checkpoint_s:
            try:
                self.checkpoint()
            except Exception as exc:  # noqa: BLE001 - the final checkpoint decides; this one only saves work
                logger.warning("could not write a checkpoint", extra={"reason": f"{type(exc).__name__}: {exc}"})
