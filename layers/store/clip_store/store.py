"""One model's stored vectors in LanceDB: ingestion, deletion, search.

A store is a LanceDB database (a folder, or a prefix of the output bucket) with two tables:

    vectors     url, bucket, key, version_id, etag, last_modified, vector, shard, ingested_at
                                                                      one row per searchable image
    deletions   url, deleted_at                                                   tombstones of removed objects

Invariants:

- `url` is the primary key of both. Ingestion upserts on it (LanceDB `merge_insert`), and the key
  is declared to Lance as the table's primary key, which makes Lance's commit check conflicts
  between concurrent inserts of the same key: two writers adding the same url at once end with
  one row, the loser re-running its merge against the winner's commit (tests/store).
- A row is rewritten only when its ETag changed and the version it holds is not newer (S3's
  LastModified, which the worker records): ingesting a shard twice changes nothing, and the late
  shard of an older upload never replaces a newer upload's vector. Versions written within the
  same second tie, and then the one ingested last wins.
- A deleted url leaves a tombstone. A row for a tombstoned url (embedded before the delete, its
  shard ingested after it) is kept only if `still_current(url, etag)` says the object exists now
  with that ETag, i.e. it was uploaded again; keeping it clears the tombstone.
- Vectors are unit length, so the ranking uses LanceDB's `dot` distance (1 - cosine) and a
  match's score is the cosine, as `clip_worker.index.Match.score` is.

Readers never load the table: a query reads the index's partitions it probes (or, below the index
threshold and for rows added since the last index update, scans those rows), and LanceDB caches
the index and manifests it has read for the life of the store object.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import IndexConfig
from lancedb.table import LanceTable

from clip_store.errors import Code, StoreError
from clip_store.location import StorageSettings

VECTORS = "vectors"
DELETIONS = "deletions"
VECTOR_COLUMN = "vector"
#: The columns a worker shard must have (clip_worker.writer.shard_schema; model columns are the store's path).
SHARD_COLUMNS = ("url", "bucket", "key", "version_id", "etag", "last_modified", VECTOR_COLUMN)
# Lance's schema marker for an (unenforced) primary key; merge_insert's conflict check uses it.
_PRIMARY_KEY = {"lance-schema:unenforced-primary-key": "true"}
# The merge's update condition: another version, and not an older one (the same rule as _older).
_NEWER_VERSION = (
    "target.etag <> source.etag AND (source.last_modified IS NULL OR target.last_modified IS NULL"
    " OR source.last_modified >= target.last_modified)"
)
# Urls per SQL `IN (...)` filter: keeps each statement small whatever the batch.
_FILTER_URLS = 1000

#: Whether the object at `url` exists now with this ETag (asked only for tombstoned urls).
StillCurrent = Callable[[str, str], bool]


def vectors_schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("url", pa.string(), nullable=False, metadata=_PRIMARY_KEY),
            pa.field("bucket", pa.string()),
            pa.field("key", pa.string()),
            pa.field("version_id", pa.string()),
            pa.field("etag", pa.string()),
            pa.field("last_modified", pa.timestamp("ms", tz="UTC")),
            pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dimensions)),
            #: The Parquet shard the row came from: where to look when a vector is questioned.
            pa.field("shard", pa.string()),
            pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
        ]
    )


DELETIONS_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False, metadata=_PRIMARY_KEY),
        pa.field("deleted_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class Match:
    url: str
    score: float


@dataclass(frozen=True)
class Ingested:
    inserted: int
    #: Rows whose object had changed (a new ETag): their vector was replaced.
    updated: int
    #: Rows already stored with the same ETag, or older than the version stored: nothing was written for them.
    unchanged: int
    #: Rows of objects deleted since they were embedded, left out.
    skipped_deleted: int


@dataclass(frozen=True)
class SearchSettings:
    """How an indexed search trades time for recall (docs/search.md, measured by bench/search_bench.py).

    `nprobes` IVF partitions are scanned with their quantised codes, and `refine_factor` x top
    candidates are re-ranked with their full vectors, so the scores returned are exact cosines.
    Either left None is chosen by the table's size (`for_rows`), since recall at a fixed setting
    falls as the table grows.
    """

    nprobes: int | None = None
    refine_factor: int | None = None

    def for_rows(self, rows: int) -> tuple[int, int]:
        """(nprobes, refine_factor) for a table of `rows`: the settings given, else those measured to
        keep recall@10 at 0.98 or more at that size (interpolated between the sizes measured, and
        probing a constant share of the partitions past the largest)."""
        nprobes, refine_factor = _MEASURED[0][1:]
        for (low, low_nprobes, _), (high, high_nprobes, high_refine) in zip(_MEASURED, _MEASURED[1:], strict=False):
            if rows > low:
                share = min(1.0, (rows - low) / (high - low))
                nprobes, refine_factor = math.ceil(low_nprobes + share * (high_nprobes - low_nprobes)), high_refine
        largest, largest_nprobes, _ = _MEASURED[-1]
        if rows > largest:
            nprobes = math.ceil(largest_nprobes * rows / largest)
        return self.nprobes or nprobes, self.refine_factor or refine_factor


#: (rows, nprobes, refine_factor) that gave recall@10 >= 0.98 on bench/search_bench.py's CLIP-like
#: 512-d mixture with IndexPolicy's 4,096-row partitions (docs/benchmarks.md, "Larger tables"):
#: 0.996 at 1M, 0.984 at 2M, 0.9945 at 10M.
_MEASURED = ((1_000_000, 20, 20), (2_000_000, 80, 20), (10_000_000, 320, 50))


@dataclass(frozen=True)
class IndexState:
    rows: int
    #: None while the table has no vector index (searches are exact).
    index_type: str | None
    indexed_rows: int
    #: Rows added since the index was last built or updated; every search scans them exactly.
    unindexed_rows: int
    #: Rows the index's partitions and codebooks were trained on (0 without an index).
    trained_rows: int


#: Field metadata on the vector column: rows the current index was trained on (maintain.py).
TRAINED_ROWS = "clip_store.trained_rows"


def sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def url_filter(urls: Sequence[str]) -> str:
    return f"url IN ({', '.join(sql_text(url) for url in urls)})"


def chunks(items: Sequence[str], size: int = _FILTER_URLS) -> Iterable[Sequence[str]]:
    return (items[start : start + size] for start in range(0, len(items), size))


class VectorStore:
    """One store, opened lazily: nothing is read until the first call that needs the table.

    `refresh_s` is how stale a reader may be: it checks for commits newer than the version it
    holds at most that often (0: before every call, as writers must; None: never, for a one-shot
    command). Safe to share between threads.
    """

    def __init__(
        self,
        uri: str,
        *,
        settings: StorageSettings | None = None,
        refresh_s: float | None = 0,
        search: SearchSettings = SearchSettings(),
    ) -> None:
        self.uri = uri
        self.search_settings = search
        self._db = lancedb.connect(
            uri,
            storage_options=(settings or StorageSettings.from_env()).options(uri),
            read_consistency_interval=None if refresh_s is None else timedelta(seconds=refresh_s),
        )
        self._lock = threading.Lock()
        self._tables: dict[str, LanceTable] = {}

    def table(self, name: str = VECTORS) -> LanceTable | None:
        """The open table, or None while nothing has been written to it."""
        with self._lock:
            if name not in self._tables:
                try:
                    # A folder or object-store connection opens LanceTables (typed as the abstract Table).
                    self._tables[name] = cast(LanceTable, self._db.open_table(name))
                except ValueError:  # LanceDB's "was not found"; other failures (network, access) propagate
                    return None
            return self._tables[name]

    def _created(self, name: str, schema: pa.Schema) -> LanceTable:
        table = self.table(name)
        if table is not None:
            return table
        try:
            created = cast(LanceTable, self._db.create_table(name, schema=schema))
        except (ValueError, RuntimeError):
            # Another writer created it first ("already exists", or Lance refusing our commit of
            # the same first version: a second create never overwrites the first).
            table = self.table(name)
            if table is None:
                raise
            return table
        with self._lock:
            return self._tables.setdefault(name, created)

    def dimensions(self) -> int | None:
        table = self.table()
        return None if table is None else table.schema.field(VECTOR_COLUMN).type.list_size

    def count(self) -> int:
        table = self.table()
        return 0 if table is None else table.count_rows()

    def ingest(self, rows: pa.Table, *, shard: str, still_current: StillCurrent) -> Ingested:
        """Adds or updates a worker shard's rows (or several shards') in one commit; idempotent.

        `shard` names where the rows came from, unless they carry a `shard` column of their own
        (shards.ingest_shards). Within the batch a url's newest version wins, its last row on a tie.
        """
        rows = _latest_per_url(_shard_rows(rows, shard))
        dimensions = rows.schema.field(VECTOR_COLUMN).type.list_size
        table = self._created(VECTORS, vectors_schema(dimensions))
        self._check_dimensions(table, dimensions, f"shard {shard or '(unnamed)'}")
        tombstoned = self._tombstoned(rows.column("url").to_pylist())
        back: set[str] = set()
        if tombstoned:
            etags = dict(zip(rows.column("url").to_pylist(), rows.column("etag").to_pylist(), strict=True))
            back = {url for url in tombstoned if still_current(url, etags[url])}
            rows = rows.filter(pc.invert(pc.is_in(rows.column("url"), pa.array(sorted(tombstoned - back), pa.string()))))
        inserted = updated = 0
        if rows.num_rows:
            result = (
                table.merge_insert("url")
                .when_matched_update_all(where=_NEWER_VERSION)
                .when_not_matched_insert_all()
                .execute(rows)
            )
            inserted, updated = result.num_inserted_rows, result.num_updated_rows
        if back:
            deletions = self._created(DELETIONS, DELETIONS_SCHEMA)
            for part in chunks(sorted(back)):
                deletions.delete(url_filter(part))
        return Ingested(inserted, updated, rows.num_rows - inserted - updated, len(tombstoned) - len(back))

    def delete(self, urls: Iterable[str]) -> int:
        """Removes these objects from search and remembers that they are gone; returns rows removed.

        The tombstone is written first: if this stops halfway, running it again completes it.
        """
        unique = sorted(set(urls))
        if not unique:
            return 0
        now = datetime.now(UTC)
        tombstones = pa.table(
            {"url": unique, "deleted_at": pa.array([now] * len(unique), pa.timestamp("us", tz="UTC"))}, schema=DELETIONS_SCHEMA
        )
        deletions = self._created(DELETIONS, DELETIONS_SCHEMA)
        deletions.merge_insert("url").when_matched_update_all().when_not_matched_insert_all().execute(tombstones)
        table = self.table()
        if table is None:
            return 0
        removed = 0
        for part in chunks(unique):
            present = table.count_rows(url_filter(part))
            if present:
                table.delete(url_filter(part))
                removed += present
        return removed

    def forget_deletions(self, before: datetime) -> None:
        """Drops the tombstones of deletions older than `before` (maintain.py decides when)."""
        deletions = self.table(DELETIONS)
        stale = f"deleted_at < TIMESTAMP '{before.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')}'"
        if deletions is not None and deletions.count_rows(stale):
            deletions.delete(stale)

    def prewarm(self) -> None:
        """Reads the whole vector index into LanceDB's cache now (its partitions' codes: ~80 bytes a
        row), so that later queries read only their re-ranked rows; for a reader's start."""
        table = self.table()
        vector_index = None if table is None else _vector_index(table)
        if table is not None and vector_index is not None:
            table.prewarm_index(vector_index.name)

    def nearest(self, query: np.ndarray, top: int, *, exclude: Sequence[str] = ()) -> list[Match]:
        """The `top` stored images most similar to `query`, best first, leaving out `exclude`."""
        table = self.table()
        if table is None or top < 1:
            return []
        vector = np.asarray(query, np.float32)
        self._check_dimensions(table, vector.shape[-1], "the query")
        vector = vector / np.linalg.norm(vector)
        settings = self.search_settings
        # The table's size is read only when a setting is left to it.
        if settings.nprobes and settings.refine_factor:
            nprobes, refine_factor = settings.nprobes, settings.refine_factor
        else:
            nprobes, refine_factor = settings.for_rows(table.count_rows())
        found = (
            table.search(vector, vector_column_name=VECTOR_COLUMN)
            .distance_type("dot")
            .nprobes(nprobes)
            .refine_factor(refine_factor)
            .limit(top + len(exclude))
            .select(["url", "_distance"])
            .to_arrow()
        )
        skip = set(exclude)
        urls, distances = found.column("url").to_pylist(), found.column("_distance").to_pylist()
        return [Match(url, 1.0 - distance) for url, distance in zip(urls, distances, strict=True) if url not in skip][:top]

    def vector_of(self, url: str) -> np.ndarray | None:
        """The stored vector of one image (for `similar`), or None if it is not in the store."""
        table = self.table()
        if table is None:
            return None
        found = table.search().where(f"url = {sql_text(url)}").select([VECTOR_COLUMN]).limit(1).to_arrow()
        if not found.num_rows:
            return None
        return found.column(VECTOR_COLUMN).combine_chunks().flatten().to_numpy()

    def index_state(self) -> IndexState:
        table = self.table()
        if table is None:
            return IndexState(0, None, 0, 0, 0)
        rows = table.count_rows()
        vector_index = _vector_index(table)
        stats = None if vector_index is None else table.index_stats(vector_index.name)
        if stats is None:
            return IndexState(rows, None, 0, rows, 0)
        metadata = table.schema.field(VECTOR_COLUMN).metadata or {}
        trained = int(metadata.get(TRAINED_ROWS.encode(), b"0"))
        return IndexState(rows, stats.index_type, stats.num_indexed_rows, stats.num_unindexed_rows, trained)

    def _tombstoned(self, urls: list[str]) -> set[str]:
        deletions = self.table(DELETIONS)
        if deletions is None or not deletions.count_rows():
            return set()
        found: set[str] = set()
        for part in chunks(urls):
            found.update(deletions.search().where(url_filter(part)).select(["url"]).to_arrow().column("url").to_pylist())
        return found

    @staticmethod
    def _check_dimensions(table: LanceTable, dimensions: int, what: str) -> None:
        stored = table.schema.field(VECTOR_COLUMN).type.list_size
        if dimensions != stored:
            raise StoreError(Code.DIMENSION_MISMATCH, f"{what} has {dimensions}-d vectors; this store holds {stored}-d vectors")


def _vector_index(table: LanceTable) -> IndexConfig | None:
    return next((index for index in table.list_indices() if VECTOR_COLUMN in index.columns), None)


def _shard_rows(rows: pa.Table, shard: str) -> pa.Table:
    missing = [name for name in SHARD_COLUMNS if name not in rows.column_names]
    if missing:
        raise StoreError(Code.BAD_SHARD, f"shard {shard or '(unnamed)'} is not a worker shard: it lacks {', '.join(missing)}")
    vector_type = rows.schema.field(VECTOR_COLUMN).type
    if not pa.types.is_fixed_size_list(vector_type):
        raise StoreError(Code.BAD_SHARD, f"shard {shard or '(unnamed)'} has a {vector_type} vector column, not a fixed-size list")
    schema = vectors_schema(vector_type.list_size)
    now = pa.array([datetime.now(UTC)] * rows.num_rows, schema.field("ingested_at").type)
    columns = [rows.column(name).cast(schema.field(name).type) for name in SHARD_COLUMNS]
    source = rows.column("shard") if "shard" in rows.column_names else pa.array([shard] * rows.num_rows, pa.string())
    return pa.Table.from_arrays([*columns, source, now], schema=schema)


def _latest_per_url(rows: pa.Table) -> pa.Table:
    # A merge whose source holds a key twice would insert it twice: keep one row a url, the newest.
    urls, modified = rows.column("url").to_pylist(), rows.column("last_modified").to_pylist()
    newest: dict[str, int] = {}
    for row, url in enumerate(urls):
        kept = newest.get(url)
        if kept is None or not _older(modified[row], modified[kept]):
            newest[url] = row
    if len(newest) == rows.num_rows:
        return rows
    return rows.take(pa.array(sorted(newest.values()), pa.int64()))


def _older(candidate: datetime | None, kept: datetime | None) -> bool:
    """Whether a row's version is older than the one kept; a version of unknown age is not."""
    return candidate is not None and kept is not None and candidate < kept
