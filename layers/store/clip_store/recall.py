"""Recall measured on the store's own vectors: the search settings its readers use.

A fixed (nprobes, refine_factor) that keeps recall@10 at 0.98 on one distribution loses it on
another, and CLIP's text queries sit in another cone than its image vectors, where IVF partitions
fit worse (issue 21: 0.83 for text at the settings that gave 0.996 for images of the mixture they
were fitted to). So after each build, retrain and growth of the index, `measure` samples probe
queries of the kinds the store answers:

- `images`: stored vectors, each left out of its own answer (an image's "similar" query);
- `shifted` and `blurred`: made from the same sample, out of its distribution as a text query is
  (`shifted`, OUT_OF_CONE): most of the vectors' common direction taken out, a direction they share
  little put in, noise added; `blurred` probes blend three vectors first, as a text describes many
  images. Always measured, so a store that was given no text probes, or only the label prompts,
  still holds its recall for a query from a cone nobody showed it;
- `texts`: text embeddings made with the store's model, when the caller has some (the indexer
  passes the label set's prompt vectors its image bakes; `maintain(text_probes=...)`),

computes their exact top-k in one streaming pass over the table (a matrix product a batch, memory
bounded by the batch and the probe count), then finds the cheapest settings at which every kind
reaches the target in two steps, since the two ways an IVF search misses are independent:

1. the fewest partitions (`RecallPolicy.nprobes`, cheapest first) that reach it with the most
   thorough refine: a query whose neighbours straddle partitions needs more of them;
2. at those, the smallest refine factor (`RecallPolicy.refine`) that still reaches it: a query far
   from the vectors' cone ranks candidates on their quantised codes less well.

The result (`Tuning`) goes into the vector column's metadata, beside the rows the index was
trained on, and `VectorStore.nearest` uses it unless its caller gives settings of its own. When no
setting reaches the target, the most thorough one is recorded with `reached=False`, and the indexer
logs it and emits SearchRecallBelowTarget (an alarm in template.yaml).

Cost: one read of the vectors (the exact answers) plus, at each of at most `len(nprobes) +
len(refine)` settings, `probes` searches a kind, kinds hardest first and none after the first that
misses. A search reads the codes of every partition it probes (past LanceDB's index cache, again
for each query): searching every kind at every setting read ~1 TB at 10M rows and had not finished
in 40 minutes; stopping at the first miss, 2.4 minutes on one mixture, ~11 on another, whose
text-like probes needed 640 of 2,441 partitions. `maintain` runs it only
after a training, or once the table has grown by `RecallPolicy.remeasure_growth` since the last
measurement, so its cost per row stays constant.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import TypeVar

import numpy as np
import pyarrow as pa
from lancedb.table import LanceTable

#: Each setting measured, at INFO: a measurement at 10M rows takes minutes (clip_indexer.train shows them).
log = logging.getLogger(__name__)
#: Field metadata on the vector column: the measured Tuning, as JSON.
TUNING = "clip_store.search"
#: Partitions a search probes, tried cheapest first; one probing more than the index has is
#: replaced by one probing them all. Doubling up to 40,960 (167M rows of 4,096): text-like queries
#: needed a quarter of the partitions at 10M on one mixture, and the step past the last one below the
#: index's partitions is to all of them, a scan of every code.
NPROBES: tuple[int, ...] = tuple(10 * 2**step for step in range(13))
#: Refine factors (candidates re-ranked on their full vectors, per result), tried at the nprobes found.
REFINE: tuple[int, ...] = (5, 10, 20, 50)
#: The out-of-distribution kinds of probe `measure` makes from its sample of stored vectors (`shifted`):
#: how many of them each probe blends (a text describes many images, blurrily), and the ranges the
#: weights of its gap direction and of its noise are drawn from (the content's weight is 1).
OUT_OF_CONE: dict[str, tuple[int, tuple[float, float], tuple[float, float]]] = {
    "shifted": (1, (2.0, 4.0), (0.5, 1.5)),
    "blurred": (3, (1.0, 2.0), (0.25, 0.75)),
}
#: The order `measure` searches the kinds in: the out-of-cone ones miss first, and settings one kind
#: misses at need no search of the others.
HARDEST_FIRST = ("shifted", "blurred", "texts", "images")
#: Gap directions among a kind's probes: a text cone is one direction, which one is unknown.
GAP_DIRECTIONS = 4
#: What a reader uses on an index no measurement has covered yet (one built before measurements
#: existed, until the next `maintain` measures it): a thorough rung, since nothing says less is enough.
UNMEASURED = (160, 50)
#: Rows a step of the exact pass: its scores, their negation and their arg-partition are probes x this
#: (4, 4 and 8 bytes a cell: 210 MB at 800 probes), the memory the measurement adds to an indexer that
#: just trained.
_SCAN_ROWS = 16_384


@dataclass(frozen=True)
class RecallPolicy:
    #: recall@k every kind of probe must reach.
    target: float = 0.98
    k: int = 10
    #: Probe queries of each kind (at most): the measurement's cost, and its precision (+-0.01 at 200).
    probes: int = 200
    #: Measure again once the table holds this many times the rows last measured.
    remeasure_growth: float = 1.25
    nprobes: tuple[int, ...] = NPROBES
    refine: tuple[int, ...] = REFINE
    seed: int = 0


@dataclass(frozen=True)
class Tuning:
    """The settings readers use, and what they were measured to give."""

    nprobes: int
    refine_factor: int
    #: recall@k at these settings, by kind of probe ("images", "shifted", "blurred", "texts").
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
        recall = ", ".join(
            f"{kind} {value:.3f}" for kind, value in sorted(self.recall.items(), key=lambda item: (item[0] != "images", item[0]))
        )
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
    """The cheapest settings at which every kind of probe reaches the target (the module's docstring)."""
    rows = table.count_rows()
    rng = np.random.default_rng(policy.seed)
    sample = np.sort(rng.choice(rows, size=min(policy.probes, rows), replace=False))
    taken = table.take_offsets(sample.tolist()).select(["url", "vector"]).to_arrow()
    images = _unit(_matrix(taken.column("vector")))
    kinds: dict[str, tuple[np.ndarray, list[str | None]]] = {
        "images": (images, taken.column("url").to_pylist()),
        **{kind: (shifted(images, rng, *made), [None] * len(images)) for kind, made in OUT_OF_CONE.items()},
    }
    # Text vectors of another width belong to another model than the store's: they cannot probe it.
    if texts is not None and len(texts) and np.shape(texts)[-1] == images.shape[1]:
        chosen = rng.choice(len(texts), size=min(policy.probes, len(texts)), replace=False)
        kinds["texts"] = (_unit(np.asarray(texts, np.float32)[np.sort(chosen)]), [None] * len(chosen))
    kinds = {kind: kinds[kind] for kind in sorted(kinds, key=HARDEST_FIRST.index)}
    exact = exact_answers(
        table, {kind: vectors for kind, (vectors, _) in kinds.items()}, {k: own for k, (_, own) in kinds.items()}, policy.k
    )

    @cache
    def kind_recall(nprobes: int, refine_factor: int, kind: str) -> float:
        vectors, own = kinds[kind]
        return recall_at(table, vectors, own, exact[kind], nprobes, refine_factor, policy.k)

    def tuning(nprobes: int, refine_factor: int, every_kind: bool = False) -> Tuning:
        recall: dict[str, float] = {}
        for kind in kinds:
            # Cached: the final setting, when nothing reached the target, is measured again with every kind,
            # and the kinds already searched there are not searched twice.
            recall[kind] = kind_recall(nprobes, refine_factor, kind)
            # Most settings tried miss, and one kind missing decides it: the others would cost a search each.
            if recall[kind] < policy.target and not every_kind:
                break
        reached = len(recall) == len(kinds) and min(recall.values()) >= policy.target
        log.info("recall@%d at nprobes %d, refine %d: %s", policy.k, nprobes, refine_factor, recall)
        return Tuning(nprobes, refine_factor, recall, policy.k, policy.target, reached, rows, len(sample))

    found = cheapest(tuning, lambda tried: tried.reached, partitions, policy.nprobes, policy.refine)
    # What nothing reached is recorded with every kind's recall, for the people told of it.
    return found if found.reached else tuning(found.nprobes, found.refine_factor, every_kind=True)


Tried = TypeVar("Tried")


def cheapest(
    attempt: Callable[[int, int], Tried],
    reached: Callable[[Tried], bool],
    partitions: int,
    nprobes: Sequence[int] = NPROBES,
    refine: Sequence[int] = REFINE,
) -> Tried:
    """The two-step search of the module's docstring: what `attempt(nprobes, refine_factor)` gave at the
    cheapest settings it `reached` at (the fewest partitions at the most thorough refine, then the
    smallest refine there), else at the most thorough settings."""
    thorough = max(refine)
    for count in probe_counts(nprobes, partitions):
        best = attempt(count, thorough)
        if reached(best):
            break
    else:
        return best
    cheaper = (attempt(count, factor) for factor in sorted(set(refine) - {thorough}))
    return next((found for found in cheaper if reached(found)), best)


def score(distance: float) -> float:
    """The cosine a LanceDB `dot` distance stands for on unit vectors: the distance is 1 - the product."""
    return 1.0 - distance


def record(table: LanceTable, tuning: Tuning) -> None:
    table.update_field_metadata({"path": "vector", "metadata": {TUNING: tuning.to_json()}})


def shifted(
    images: np.ndarray, rng: np.random.Generator, blend: int, gap: tuple[float, float], noise: tuple[float, float]
) -> np.ndarray:
    """Queries out of `images`' distribution, as CLIP's text embeddings are out of its image embeddings'
    (the "modality gap"): the mean of `blend` of the images, with the images' common direction
    taken out, one of GAP_DIRECTIONS directions orthogonal to it put in (weighted from `gap`), and
    isotropic noise (weighted from `noise`). Their neighbours are ranked partly by that direction,
    which the IVF partitions and the quantised codes were not fitted to, and, blended, straddle
    partitions: the cases where a search misses most."""
    count, dimensions = images.shape
    common = _unit(images.mean(axis=0, keepdims=True))[0]
    directions = rng.standard_normal((GAP_DIRECTIONS, dimensions)).astype(np.float32)
    directions = _unit(directions - np.outer(directions @ common, common))
    blended = images if blend == 1 else images[rng.integers(0, count, (count, blend))].mean(axis=1)
    content = _unit(blended - 0.8 * np.outer(blended @ common, common))
    offsets = rng.uniform(*gap, (count, 1)) * directions[np.arange(count) % GAP_DIRECTIONS]
    blur = rng.uniform(*noise, (count, 1)) * rng.standard_normal((count, dimensions)) / np.sqrt(dimensions)
    return _unit(content + offsets + blur).astype(np.float32)


def probe_counts(nprobes: Sequence[int], partitions: int) -> list[int]:
    """The nprobes that probe fewer partitions than the index has, then one that probes them all."""
    return [*(count for count in nprobes if count < partitions), partitions]


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), -1).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


@dataclass(frozen=True)
class Answer:
    """A probe's exact top-k: their urls, and the k-th best score."""

    urls: frozenset[str]
    floor: float

    def hits(self, found: Sequence[tuple[str, float]]) -> int:
        """How many of `found` ((url, score), a search's first k) are exact answers: by url, or by a score
        tying the k-th's. One image stored under many keys (a placeholder, a re-upload) is the same
        vector many times, and any k of those are as right as the k the exact pass happened to keep."""
        return sum(1 for url, score in found if url in self.urls or score >= self.floor - _TIE)


#: Scores closer than this are ties: LanceDB's re-ranking and numpy round float32 products differently.
_TIE = 1e-4


def exact_answers(
    table: LanceTable, probes: dict[str, np.ndarray], own: dict[str, list[str | None]], k: int
) -> dict[str, list[Answer]]:
    """Each probe's exact top-k (its own url left out), in one pass over the table."""
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
    answers = []
    # Best first: without its own row (or, for a text, as it comes) a probe keeps its k best.
    for found, scores, owner in zip(best_urls.tolist(), best_scores.tolist(), owners, strict=True):
        kept = [(url, score) for url, score in zip(found, scores, strict=True) if url != owner][:k]
        answers.append(Answer(frozenset(url for url, _ in kept), kept[-1][1] if len(kept) == k else -np.inf))
    exact: dict[str, list[Answer]] = {}
    start = 0
    for kind, vectors in probes.items():
        exact[kind] = answers[start : start + len(vectors)]
        start += len(vectors)
    return exact


def recall_at(
    table: LanceTable,
    probes: np.ndarray,
    own: list[str | None],
    exact: list[Answer],
    nprobes: int,
    refine_factor: int,
    k: int,
) -> float:
    """recall@k of `probes` at those settings against their `exact` answers, each probe's `own` row (a stored
    vector's url, or None) left out of its answer."""
    hits = 0
    for start in range(0, len(probes), _BATCH):
        batch = slice(start, start + _BATCH)
        found = search(table, probes[batch], nprobes, refine_factor, k + 1)
        for answer, owner, truth in zip(found, own[batch], exact[batch], strict=True):
            hits += truth.hits([(url, value) for url, value in answer if url != owner][:k])
    return round(hits / max(1, sum(len(truth.urls) for truth in exact)), 4)


#: Probes a LanceDB search takes at once: it runs them in parallel, and their re-ranking reads their
#: candidates together (25 x 550 rows at refine 50). At 1M rows, 20 at once measured faster than one
#: at a time (7.2 s against 12.8 s a setting of 800 probes) and than all 800 at once (10.3 s).
_BATCH = 25


def search(table: LanceTable, vectors: np.ndarray, nprobes: int, refine_factor: int, limit: int) -> list[list[tuple[str, float]]]:
    """For each of `vectors` (unit vectors, one a row), the `limit` rows nearest it at those settings,
    (url, cosine) best first: what every reader runs, and what `measure` measures."""
    found = (
        # A reader's one vector goes as itself (LanceDB answers a list of one without query_index).
        table.search(vectors[0] if len(vectors) == 1 else list(vectors), vector_column_name="vector")
        .distance_type("dot")
        .nprobes(nprobes)
        .refine_factor(refine_factor)
        .limit(limit)
        .select(["url", "_distance"])
        .to_arrow()
    )
    queries = found.column("query_index").to_pylist() if "query_index" in found.column_names else [0] * found.num_rows
    answers: list[list[tuple[str, float]]] = [[] for _ in vectors]
    columns = (found.column(name).to_pylist() for name in ("url", "_distance"))
    for query, url, distance in sorted(zip(queries, *columns, strict=True), key=lambda row: (row[0], row[2])):
        answers[query].append((url, score(distance)))
    return answers


def partitions_of(trained_rows: int, rows_per_partition: int) -> int:
    """The IVF partitions LanceDB made for `trained_rows` at that target size."""
    return max(1, trained_rows // rows_per_partition)
