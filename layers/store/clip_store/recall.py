"""Recall measured on the store's own vectors: the search settings its readers use.

A fixed (nprobes, refine_factor) that keeps recall@10 at 0.98 on one distribution loses it on
another, and CLIP's text queries sit in another cone than its image vectors, where IVF partitions
fit worse (issue 21: 0.83 for text at the settings that gave 0.996 for images of the mixture they
were fitted to). So after each build, retrain and growth of the index, `measure` samples probe
queries of the kinds the store answers:

- `images`: stored vectors, each left out of its own answer (an image's "similar" query);
- `texts`: text embeddings made with the store's model, when the caller has some (the indexer
  passes the label set's prompt vectors its image bakes; `maintain(text_probes=...)`),

computes their exact top-k in one streaming pass over the table (a matrix product a batch, memory
bounded by the batch and the probe count), and walks a ladder of settings from the cheapest up,
keeping the first at which every kind reaches the target. The result (`Tuning`) goes into the
vector column's metadata, beside the rows the index was trained on, and `VectorStore.nearest`
uses it unless its caller gives settings of its own. When no rung reaches the target, the most
thorough one is recorded with `reached=False`, and the indexer logs it and emits
SearchRecallBelowTarget (an alarm in template.yaml).

Cost: one read of the vectors (the exact answers) plus at most `len(ladder)` batched searches of
`probes` queries a kind; `maintain` runs it only after a training, or once the table has grown by
`RecallPolicy.remeasure_growth` since the last measurement, so its cost per row stays constant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from lancedb.table import LanceTable

#: Field metadata on the vector column: the measured Tuning, as JSON.
TUNING = "clip_store.search"
#: (nprobes, refine_factor), cheapest first: the settings `measure` tries in turn. A rung probing
#: more partitions than the index has is replaced by one probing them all.
LADDER: tuple[tuple[int, int], ...] = (
    (10, 10),
    (20, 20),
    (40, 20),
    (80, 20),
    (80, 50),
    (120, 40),
    (160, 50),
    (320, 50),
    (640, 100),
    (1280, 100),
)
#: What a reader uses on an index no measurement has covered yet (one built before measurements
#: existed, until the next `maintain` measures it): a thorough rung, since nothing says less is enough.
UNMEASURED = (160, 50)
_SCAN_ROWS = 65_536


@dataclass(frozen=True)
class RecallPolicy:
    #: recall@k every kind of probe must reach.
    target: float = 0.98
    k: int = 10
    #: Probe queries of each kind (at most): the measurement's cost, and its precision (+-0.01 at 200).
    probes: int = 200
    #: Measure again once the table holds this many times the rows last measured.
    remeasure_growth: float = 1.25
    ladder: tuple[tuple[int, int], ...] = LADDER
    seed: int = 0


@dataclass(frozen=True)
class Tuning:
    """The settings readers use, and what they were measured to give."""

    nprobes: int
    refine_factor: int
    #: recall@k at these settings, by kind of probe ("images", "texts").
    recall: dict[str, float]
    k: int
    target: float
    #: Whether every kind reached the target (else these are the most thorough settings tried).
    reached: bool
    #: Rows in the table when measured.
    rows: int
    probes: int
    measured_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def summary(self) -> str:
        """One line for people: the settings, and the recall they gave against the target."""
        recall = ", ".join(f"{kind} {value:.3f}" for kind, value in sorted(self.recall.items()))
        verdict = "reached" if self.reached else "NOT reached at any setting"
        return (
            f"nprobes {self.nprobes}, refine {self.refine_factor}: recall@{self.k} {recall} "
            f"(target {self.target} {verdict}; {self.probes} probes a kind at {self.rows:,} rows, {self.measured_at})"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> Tuning | None:
        """The recorded Tuning; None if none is, or if it cannot be read (written by another version of this
        code): a reader then searches as on an unmeasured index rather than fail, and the next upkeep
        that measures writes it again."""
        found = (metadata or {}).get(TUNING.encode())
        if not found:
            return None
        try:
            fields = json.loads(found)
            known = {name: fields[name] for name in cls.__dataclass_fields__ if name in fields}
            return cls(**known)
        except (ValueError, TypeError):
            return None


def measure(table: LanceTable, partitions: int, policy: RecallPolicy = RecallPolicy(), texts: np.ndarray | None = None) -> Tuning:
    """The cheapest rung of the policy's ladder at which every kind of probe reaches the target."""
    rows = table.count_rows()
    rng = np.random.default_rng(policy.seed)
    sample = np.sort(rng.choice(rows, size=min(policy.probes, rows), replace=False))
    taken = table.take_offsets(sample.tolist()).select(["url", "vector"]).to_arrow()
    kinds: dict[str, tuple[np.ndarray, list[str | None]]] = {
        "images": (_unit(_matrix(taken.column("vector"))), taken.column("url").to_pylist())
    }
    # Text vectors of another width belong to another model than the store's: they cannot probe it.
    if texts is not None and len(texts) and np.shape(texts)[-1] == kinds["images"][0].shape[1]:
        chosen = rng.choice(len(texts), size=min(policy.probes, len(texts)), replace=False)
        kinds["texts"] = (_unit(np.asarray(texts, np.float32)[np.sort(chosen)]), [None] * len(chosen))
    exact = exact_answers(
        table, {kind: vectors for kind, (vectors, _) in kinds.items()}, {k: own for k, (_, own) in kinds.items()}, policy.k
    )
    best: Tuning | None = None
    for nprobes, refine_factor in rungs(policy.ladder, partitions):
        recall = {
            kind: _recall(table, vectors, own, exact[kind], nprobes, refine_factor, policy.k)
            for kind, (vectors, own) in kinds.items()
        }
        reached = min(recall.values()) >= policy.target
        best = Tuning(nprobes, refine_factor, recall, policy.k, policy.target, reached, rows, len(sample))
        if reached:
            break
    assert best is not None  # the ladder always has a rung
    return best


def record(table: LanceTable, tuning: Tuning) -> None:
    table.update_field_metadata({"path": "vector", "metadata": {TUNING: tuning.to_json()}})


def rungs(ladder: Sequence[tuple[int, int]], partitions: int) -> list[tuple[int, int]]:
    """The ladder's rungs that probe fewer partitions than the index has, then one that probes them all."""
    fewer = [(nprobes, refine) for nprobes, refine in ladder if nprobes < partitions]
    return [*fewer, (partitions, max(refine for _, refine in ladder))]


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), -1).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def exact_answers(
    table: LanceTable, probes: dict[str, np.ndarray], own: dict[str, list[str | None]], k: int
) -> dict[str, list[set[str]]]:
    """Each probe's exact top-k urls (its own url left out), in one pass over the table."""
    everything = np.concatenate(list(probes.values()))
    owners = [url for kind in probes for url in own[kind]]
    keep = k + 1  # one more: a probe's own row is among the best
    best_scores = np.full((len(everything), 0), -np.inf, np.float32)
    best_urls = np.empty((len(everything), 0), object)
    for batch in table.search().select(["url", "vector"]).to_batches(_SCAN_ROWS):
        if not batch.num_rows:
            continue
        urls = np.asarray(batch.column("url").to_pylist(), object)
        scores = everything @ _matrix(batch.column("vector")).T
        top = min(keep, batch.num_rows)
        index = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        scores = np.concatenate([best_scores, np.take_along_axis(scores, index, axis=1)], axis=1)
        candidates = np.concatenate([best_urls, urls[index]], axis=1)
        order = np.argsort(-scores, axis=1)[:, :keep]
        best_scores, best_urls = np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)
    # Best first: without its own row (or, for a text, as it comes) a probe keeps its k best.
    answers = [set([url for url in found if url != owner][:k]) for found, owner in zip(best_urls.tolist(), owners, strict=True)]
    exact: dict[str, list[set[str]]] = {}
    start = 0
    for kind, vectors in probes.items():
        exact[kind] = answers[start : start + len(vectors)]
        start += len(vectors)
    return exact


def _recall(
    table: LanceTable,
    probes: np.ndarray,
    own: list[str | None],
    exact: list[set[str]],
    nprobes: int,
    refine_factor: int,
    k: int,
) -> float:
    found = (
        table.search(probes, vector_column_name="vector")
        .distance_type("dot")
        .nprobes(nprobes)
        .refine_factor(refine_factor)
        .limit(k + 1)
        .select(["url", "_distance"])
        .to_arrow()
        .sort_by([("query_index", "ascending"), ("_distance", "ascending")])
    )
    answers: list[list[str]] = [[] for _ in own]
    for query, url in zip(found.column("query_index").to_pylist(), found.column("url").to_pylist(), strict=True):
        if url != own[query]:
            answers[query].append(url)
    hits = sum(len(set(answer[:k]) & truth) for answer, truth in zip(answers, exact, strict=True))
    return round(hits / max(1, sum(len(truth) for truth in exact)), 4)


def partitions_of(trained_rows: int, rows_per_partition: int) -> int:
    """The IVF partitions LanceDB made for `trained_rows` at that target size."""
    return max(1, trained_rows // rows_per_partition)
