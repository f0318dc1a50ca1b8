"""Keeping a store fast as it grows: when to build, update and retrain its ANN index.

`maintain(store)` is what the ingesting side calls after each ingest (or every few minutes); it
reads only table metadata when there is nothing to do, and does at most one of:

- **build** the vector index (and a B-tree on `url`, for `vector_of` and the ingest's upsert)
  once the table has `exact_below` rows; below that every search is exact, a scan of every row;
- **retrain** it (new IVF partitions and quantiser) once the table has grown `retrain_growth`
  times past the rows it was trained on, since partitions trained on a tenth of the data fit the
  rest badly and grow unevenly, or once its codes are not the policy's (`code_bits`);
- **update** it (LanceDB `optimize`: compact small fragments, add unindexed rows to the existing
  partitions without retraining, drop versions older than `keep_versions`) once `max_unindexed`
  rows have arrived since the last build or update;
- **compact** the table (the same `optimize`) once `max_fragments` of its data files are not yet
  under the index (all of them before there is an index), whatever its size: each commit adds one,
  and a reader opens each, so a store kept small by churn (many small batches, deletes) would
  otherwise cost a query one request per commit it ever saw. An update folds the new files into a
  new index segment, and files under different segments are never compacted together, so once the
  index has `max_fragments` segments it is retrained, which merges them, and then compacted.

After a build or retrain, and whenever the table has grown `recall.remeasure_growth` times past
the rows last measured (an update, or nothing else due: `Action.MEASURE`), it **measures** the
recall of the index on the store's own vectors, and on text probes when the caller gives them
(`text_probes`), and records the cheapest search settings that reach the target (recall.py);
every reader uses them.

The tombstones are compacted by the same rule, and those older than `keep_tombstones` are
forgotten: by then no shard embedded before the removal can still be on its way.

A build or retrain takes a lease first (lease.S3Lease, given by the indexer and `clip-pipeline
index`): of two indexer containers for which it falls due at once, one trains and the other goes on.

Upkeep never fails what was committed before it: a commit conflict with another writer (two
indexer containers: a compaction preempted by the other's delete) leaves the upkeep to the next
batch (`Maintenance.conflict`), and callers treat any other upkeep error the same way.

Rows not yet in the index are searchable all along: LanceDB scans them exactly next to the
index search and merges the results, so `max_unindexed` bounds that scan's cost, not freshness.
A build or retrain of millions of rows is long (docs/search.md), and a Lambda has 15 minutes: a
policy's `max_train_rows` leaves one past that size for a process without a time limit
(the AWS Batch job `python -m clip_indexer.train`, clip_store.trainer), and meanwhile the
index keeps serving, still takes in new rows (updates add them to its existing partitions; only
their balance suffers), and the data files are still compacted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

import numpy as np
from lancedb.index import BTree, IvfRq
from lancedb.table import LanceTable

from clip_store import recall
from clip_store.recall import RecallPolicy
from clip_store.store import CODE_BITS, TRAINED_ROWS, VECTOR_COLUMN, IndexState, VectorStore, fragment_count
from clip_store.tombstones import TABLE as TOMBSTONES

log = logging.getLogger(__name__)


class Action(StrEnum):
    NONE = "none"
    BUILD = "build"
    RETRAIN = "retrain"
    UPDATE = "update"
    COMPACT = "compact"
    #: Measure the index's recall and record the settings that reach the target (recall.py).
    MEASURE = "measure"


@dataclass(frozen=True)
class IndexPolicy:
    #: Below this many rows a search scans every vector: 20 MB of 512-d vectors, which a query
    #: on S3 reads whole each time, so it is kept small although a local scan of more is fast.
    exact_below: int = 10_000
    #: Rows added since the last build or update before they are folded into the index; every
    #: query scans them exactly, so this bounds what a query reads beyond the index.
    max_unindexed: int = 10_000
    #: Retrain once the table holds this many times the rows the index was trained on.
    retrain_growth: float = 4.0
    #: IVF partition size: a query scans SearchSettings.nprobes partitions of about this many rows.
    #: Constant, so a query's cost stays flat as partitions multiply (docs/search.md).
    rows_per_partition: int = 4096
    #: Bits a dimension of the RaBitQ codes the partitions are ranked on (1, 2, 4 or 8): with 1 bit a
    #: query from another cone (a text) ranks its candidates so badly that no refine factor gets it to
    #: recall 0.98; with 4, a refine factor of 5 did on both mixtures measured (docs/benchmarks.md,
    #: "Index types"). 256 bytes a 512-d vector, 3.5x the 1-bit index.
    code_bits: int = 4
    #: The most rows the IVF k-means trains on (LanceDB samples `sample_rate` rows a partition, 256 by
    #: default): 6.25M rows, 12.8 GB of 512-d vectors, at 100M; capped, the sample stays within a few
    #: GB at any size, with no fewer than MIN_SAMPLE_RATE rows a centroid.
    max_train_sample: int = 2_000_000
    #: Data files (one per commit) not yet under the index before a table is compacted, whatever its
    #: size; and index segments (one per update) before the index is retrained to merge them.
    max_fragments: int = 8
    #: How long replaced data files are kept for readers still on an older version.
    keep_versions: timedelta = timedelta(hours=1)
    #: Longer than a shard can take to arrive: SQS keeps a message at most 14 days.
    keep_tombstones: timedelta = timedelta(days=15)
    #: The most rows this process may train an index on (None: no limit). A build or retrain of a
    #: bigger table is deferred (Maintenance.deferred), and updates go on in the meantime.
    max_train_rows: int | None = None
    #: The recall readers are to get, and how it is measured.
    recall: RecallPolicy = RecallPolicy()


@dataclass(frozen=True)
class Maintenance:
    action: Action
    state: IndexState
    seconds: float
    #: A build or retrain that was due but not done: the table is past the policy's max_train_rows.
    deferred: Action | None = None
    #: Another writer's commit came first: the upkeep is left to the next call.
    conflict: bool = False
    #: A training was due and another caller holds the lease: it trains, this one did nothing.
    busy: bool = False
    #: Whether the recall was measured (the result is `state.tuning`).
    measured: bool = False


def plan(state: IndexState, policy: IndexPolicy) -> Action:
    if state.index_type is None:
        return Action.BUILD if state.rows >= policy.exact_below else _upkeep(state, policy)
    grown = state.rows >= policy.retrain_growth * max(state.trained_rows, 1)
    # An index of other codes than the policy's (1-bit, before issue 21) is retrained once: no search
    # setting gets text-like queries to the target on 1-bit codes.
    if grown or state.index_segments >= policy.max_fragments or state.code_bits != policy.code_bits:
        return Action.RETRAIN
    upkeep = _upkeep(state, policy)
    return Action.MEASURE if upkeep is Action.NONE and _measure_due(state, policy) else upkeep


def _upkeep(state: IndexState, policy: IndexPolicy) -> Action:
    """What is due besides a training: new rows into the index, data files compacted (an update compacts too)."""
    if state.index_type is None:
        return Action.COMPACT if state.fragments >= policy.max_fragments else Action.NONE
    if state.unindexed_rows >= policy.max_unindexed or state.fragments - state.index_segments >= policy.max_fragments:
        return Action.UPDATE
    return Action.NONE


def _measure_due(state: IndexState, policy: IndexPolicy) -> bool:
    tuning = state.tuning
    return state.index_type is not None and (tuning is None or state.rows >= policy.recall.remeasure_growth * tuning.rows)


class Lease(Protocol):
    """Who may train a store's index now (lease.S3Lease): `hold()` yields whether this caller may."""

    def hold(self) -> AbstractContextManager[bool]: ...


#: Text embeddings made with the store's model, for probing text -> image recall (None: none at hand).
TextProbes = Callable[[], np.ndarray | None]


def maintain(
    store: VectorStore, policy: IndexPolicy = IndexPolicy(), lease: Lease | None = None, text_probes: TextProbes | None = None
) -> Maintenance:
    """Does what `plan` says is due, within the policy's max_train_rows, and returns the state afterwards.

    With a `lease`, a build or retrain is done only by its holder: another caller training the same
    index meanwhile leaves it to them (`Maintenance.busy`). The recall is measured after a training
    and as the table grows (the module's docstring), with `text_probes` when given: called only then.
    """
    started = time.monotonic()
    state = store.index_state()
    action, deferred = plan(state, policy), None
    too_big = policy.max_train_rows is not None and state.rows > policy.max_train_rows
    if action in (Action.BUILD, Action.RETRAIN, Action.MEASURE) and too_big:
        # Meanwhile the rest of the upkeep goes on: readers scan unindexed rows and small files until the job ends.
        deferred, action = action, _upkeep(state, policy)
    table = store.table()
    measured = False
    try:
        if table is not None and action in (Action.BUILD, Action.RETRAIN):
            with lease.hold() if lease is not None else nullcontext(True) as held:
                if not held:
                    return Maintenance(Action.NONE, state, time.monotonic() - started, deferred, busy=True)
                _train(table, policy, build=action is Action.BUILD)
                # One index over every row now: the data files it covers can be compacted together.
                table.optimize(cleanup_older_than=policy.keep_versions)
        elif table is not None and action in (Action.UPDATE, Action.COMPACT):
            table.optimize(cleanup_older_than=policy.keep_versions)
        _keep_tombstones_small(store, policy, forget=action not in (Action.NONE, Action.MEASURE))
        after = store.index_state()
        if table is not None and (action in (Action.BUILD, Action.RETRAIN) or _measure_due(after, policy)):
            if too_big:
                # A measurement reads every vector: past what this process trains, the trainer does it.
                deferred = deferred or Action.MEASURE
            else:
                partitions = recall.partitions_of(after.trained_rows, policy.rows_per_partition)
                texts = text_probes() if text_probes is not None else None
                recall.record(table, recall.measure(table, partitions, policy.recall, texts))
                measured = True
    except (OSError, RuntimeError) as exc:
        if not is_commit_conflict(exc):
            raise
        return Maintenance(action, state, time.monotonic() - started, deferred, conflict=True)
    return Maintenance(action, store.index_state(), time.monotonic() - started, deferred, measured=measured)


def _train(table: LanceTable, policy: IndexPolicy, build: bool) -> None:
    rows = table.count_rows()
    # RaBitQ codes ranked within the probed partitions, then the best candidates re-ranked exactly
    # (SearchSettings.refine_factor).
    config = IvfRq(
        distance_type="dot",
        target_partition_size=policy.rows_per_partition,
        num_bits=policy.code_bits,
        sample_rate=sample_rate(rows, policy),
    )
    log.info("training a %d-bit IVF_RQ index on %d rows (k-means on %d a partition)", policy.code_bits, rows, config.sample_rate)
    table.create_index(VECTOR_COLUMN, config=config, replace=True)
    # The settings measured on the index just replaced are forgotten with it: should this process end
    # before it measures the new one, readers search as on an unmeasured index, and the next upkeep measures.
    metadata = {TRAINED_ROWS: str(rows), CODE_BITS: str(policy.code_bits), recall.TUNING: ""}
    table.update_field_metadata({"path": VECTOR_COLUMN, "metadata": metadata})
    if build:
        table.create_index("url", config=BTree(), replace=True)


#: Fewer rows a centroid than this and k-means fits its partitions to the sample's noise.
MIN_SAMPLE_RATE = 40


def sample_rate(rows: int, policy: IndexPolicy) -> int:
    """Rows a partition the k-means trains on: LanceDB's 256, unless that passes max_train_sample."""
    partitions = recall.partitions_of(rows, policy.rows_per_partition)
    return max(MIN_SAMPLE_RATE, min(256, policy.max_train_sample // partitions))


def is_commit_conflict(exc: BaseException) -> bool:
    """Lance's refusal of a commit that another writer's commit preempted (it says to retry)."""
    return "conflict" in str(exc).lower()


def _keep_tombstones_small(store: VectorStore, policy: IndexPolicy, forget: bool) -> None:
    """Forgets old tombstones along with the vectors' upkeep, and compacts them by the same rule."""
    table: LanceTable | None = store.tombstones.database.table(TOMBSTONES)
    if table is None:
        return
    compact = fragment_count(table) >= policy.max_fragments
    if forget or compact:
        store.tombstones.forget(before=datetime.now(UTC) - policy.keep_tombstones)
    if compact:
        # Every ingest looks its urls up here twice: past a few thousand tombstones (15 days of
        # removals, rejections and failures) a B-tree on url keeps that a lookup, not a scan.
        if not table.list_indices() and table.count_rows() >= policy.exact_below:
            table.create_index("url", config=BTree(), replace=True)
        table.optimize(cleanup_older_than=policy.keep_versions)
