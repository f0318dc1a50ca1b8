"""One model's stored vectors in LanceDB: ingestion, removal, search.

A store is a LanceDB database (a folder, or a prefix of the output bucket) with one table,

    vectors     url, bucket, key, version_id, etag, last_modified, vector, shard, ingested_at
                                                                      one row per searchable image

and it consults `Tombstones` (tombstones.py): in the indexer one table shared by every model's
store, elsewhere a `deletions` table beside `vectors`.

Invariants (docs/search.md, "Consistency", states what they guarantee sequence by sequence):

- `url` is the primary key. Ingestion upserts on it (LanceDB `merge_insert`), and the key is
  declared to Lance as the table's primary key, which makes Lance's commit check conflicts between
  concurrent inserts of the same key: two writers adding the same url at once end with one row, the
  loser re-running its merge against the winner's commit (tests/store).
- A row is rewritten only by another version that is not older (S3's LastModified, which the
  worker records): ingesting a shard twice changes nothing, and the late shard of an older upload
  never replaces a newer upload's vector. Two versions written within the same second (S3 keeps
  LastModified to the second) are told apart by asking S3 which one is current.
- A tombstoned url's row is ingested only if `still_current(url, etag)` says the object exists now
  with that ETag; ingesting it clears the tombstone (unless a newer one was written meanwhile).
  A tombstone written while an ingest is under way is checked again after its commit, so a removal
  is never lost between two writers (docs/search.md, "Two writers").
- Vectors are unit length, so the ranking uses LanceDB's `dot` distance (1 - cosine) and a
  match's score is the cosine, as `clip_worker.index.Match.score` is.

Readers never load the table: a query reads the index's partitions it probes (or, below the index
threshold and for rows added since the last index update, scans those rows), and LanceDB caches
the index and manifests it has read for the life of the store object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import IndexConfig
from lancedb.table import LanceTable

from clip_store.database import INDEX_CACHE_BYTES, Database, chunks, sql_text, url_filter
from clip_store.errors import Code, StoreError
from clip_store.location import StorageSettings
from clip_store.recall import UNMEASURED, Tuning, search
from clip_store.tombstones import PRIMARY_KEY, Tombstones

VECTORS = "vectors"
VECTOR_COLUMN = "vector"
#: The columns a worker shard must have (clip_worker.writer.shard_schema; model columns are the store's path).
SHARD_COLUMNS = ("url", "bucket", "key", "version_id", "etag", "last_modified", VECTOR_COLUMN)

#: Whether the object at `url` exists now with this ETag (asked for tombstoned urls and ties).
StillCurrent = Callable[[str, str], bool]


def vectors_schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("url", pa.string(), nullable=False, metadata=PRIMARY_KEY),
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
    #: Rows of objects removed (or changed) since they were embedded: left out, or withdrawn right after
    #: the commit when another writer's removal came meanwhile (those are also counted as written).
    skipped_deleted: int
    #: Urls S3 would not answer a HEAD for (their rows were left out: a later try ingests them).
    unchecked: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchSettings:
    """How an indexed search trades time for recall, when its caller chooses (docs/search.md).

    `nprobes` IVF partitions are scanned with their quantised codes, and `refine_factor` x top
    candidates are re-ranked with their full vectors, so the scores returned are exact cosines.
    Either left None is the one `maintain` measured to reach the target recall on this store's own
    vectors and queries (recall.Tuning, in the table's metadata).
    """

    nprobes: int | None = None
    refine_factor: int | None = None

    def resolve(self, tuning: Tuning | None) -> tuple[int, int]:
        """(nprobes, refine_factor): the settings given, else those measured, else recall.UNMEASURED's."""
        nprobes, refine_factor = (tuning.nprobes, tuning.refine_factor) if tuning is not None else UNMEASURED
        return self.nprobes or nprobes, self.refine_factor or refine_factor


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
    #: Data files: each commit adds one, and a reader opens each it scans, so compaction keeps them few.
    fragments: int = 0
    #: The vector index's segments: each update adds one over the rows it folds in, and data files
    #: under different segments are not compacted together, so they are merged by a retrain.
    index_segments: int = 0
    #: The search settings last measured on this table and the recall they gave (None: not measured).
    tuning: Tuning | None = None
    #: Bits a dimension of the index's codes (maintain.IndexPolicy.code_bits; 0 without an index).
    code_bits: int = 0


#: Field metadata on the vector column: rows the current index was trained on, and its codes' bits (maintain.py).
TRAINED_ROWS = "clip_store.trained_rows"
CODE_BITS = "clip_store.code_bits"
#: The bits of an index trained before they were recorded.
FIRST_CODE_BITS = 1


class VectorStore:
    """One store, opened lazily: nothing is read until the first call that needs the table.

    `refresh_s` is how stale a reader may be, `index_cache_bytes` how much of the index it keeps
    (database.Database). `tombstones` is where removals
    are kept: by default a table beside the vectors; the indexer gives every model's store the one
    shared table (tombstones_uri), so that a removal holds for a model whose store is yet to exist.
    Safe to share between threads.
    """

    def __init__(
        self,
        uri: str,
        *,
        settings: StorageSettings | None = None,
        refresh_s: float | None = 0,
        search: SearchSettings = SearchSettings(),
        tombstones: Tombstones | None = None,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
    ) -> None:
        self.uri = uri
        self.search_settings = search
        self.database = Database(uri, settings=settings, refresh_s=refresh_s, index_cache_bytes=index_cache_bytes)
        self.tombstones = tombstones or Tombstones(self.database)

    def table(self) -> LanceTable | None:
        """The open vectors table, or None while nothing has been ingested."""
        return self.database.table(VECTORS)

    def dimensions(self) -> int | None:
        table = self.table()
        return None if table is None else table.schema.field(VECTOR_COLUMN).type.list_size

    def count(self) -> int:
        table = self.table()
        return 0 if table is None else table.count_rows()

    def ingest(self, rows: pa.Table, *, shard: str, still_current: StillCurrent) -> Ingested:
        """Adds or updates a worker shard's rows (or several shards') in one commit; idempotent.

        `shard` names where the rows came from, unless they carry a `shard` column of their own
        (shards.ingest_shards). Within the batch, and against the rows stored, a url's newest
        version wins; a tie of two versions within one second goes to the one S3 says is current.
        A url S3 would not answer for is left out and named in `Ingested.unchecked`.
        """
        checked = _Checked(still_current)
        rows = _latest_per_url(shard_rows(rows, shard), checked)
        dimensions = rows.schema.field(VECTOR_COLUMN).type.list_size
        table = self.database.created(VECTORS, vectors_schema(dimensions))
        self._check_dimensions(table, dimensions, f"shard {shard or '(unnamed)'}")
        total = rows.num_rows
        wanted, confirmed = _decide(rows, self.versions(rows.column("url").to_pylist()), checked)
        rows = rows.filter(pa.array(wanted, pa.bool_()))
        unchanged = total - rows.num_rows
        etags = dict(zip(rows.column("url").to_pylist(), rows.column("etag").to_pylist(), strict=True))
        # A tombstone stays until it is forgotten (IndexPolicy.keep_tombstones): every later row of
        # its url is checked against S3, so no shard of a removed version gets back in, however late.
        seen = self.tombstones.of(list(etags))
        gone = sorted(url for url in seen if not checked(url, etags[url]))
        if gone:
            rows = rows.filter(pc.invert(pc.is_in(rows.column("url"), pa.array(gone, pa.string()))))
        inserted = updated = withdrawn = 0
        if rows.num_rows:
            result = (
                table.merge_insert("url")
                .when_matched_update_all(where=_replacing(confirmed))
                .when_not_matched_insert_all()
                .execute(rows)
            )
            inserted, updated = result.num_inserted_rows, result.num_updated_rows
            if inserted + updated < rows.num_rows:  # another writer committed some of these urls meanwhile
                updated += self._settle_ties(table, rows, checked)
            withdrawn = self._withdraw_removed_meanwhile(rows, seen, checked)
        unchanged += rows.num_rows - inserted - updated
        skipped = len(set(gone) - set(checked.failed)) + withdrawn
        return Ingested(inserted, updated, unchanged, skipped, tuple(sorted(checked.failed)))

    def _settle_ties(self, table: LanceTable, rows: pa.Table, checked: StillCurrent) -> int:
        """After a merge that another writer's commit overtook: where that writer's row and ours were
        written within the same second, the version S3 says is current replaces the other."""
        stored = self.versions(rows.column("url").to_pylist())
        urls, etags, modified = (rows.column(name).to_pylist() for name in ("url", "etag", "last_modified"))
        current = [
            index
            for index, (url, etag, when) in enumerate(zip(urls, etags, modified, strict=True))
            if url in stored and stored[url][0] != etag and when is not None and stored[url][1] == when and checked(url, etag)
        ]
        if not current:
            return 0
        ours = rows.take(pa.array(current, pa.int64()))
        confirmed = ours.column("etag").to_pylist()
        return int(table.merge_insert("url").when_matched_update_all(where=_replacing(confirmed)).execute(ours).num_updated_rows)

    def _withdraw_removed_meanwhile(self, rows: pa.Table, seen: Mapping[str, datetime], still_current: StillCurrent) -> int:
        """Removes the rows just committed whose url another writer tombstoned since `seen` was read.

        That writer's removal may have read the table before this commit and found nothing to
        remove; reading the tombstones again after the commit closes the gap whatever the
        interleaving (docs/search.md, "Two writers").
        """
        etags = dict(zip(rows.column("url").to_pylist(), rows.column("etag").to_pylist(), strict=True))
        now = self.tombstones.of(list(etags))
        fresh = {url: etags[url] for url, when in now.items() if seen.get(url) != when}
        stale = {url: etag for url, etag in fresh.items() if not still_current(url, etag)}
        return self._remove_versions(stale)

    def versions(self, urls: Sequence[str]) -> dict[str, tuple[str, datetime | None]]:
        """The stored (etag, last_modified) of those of `urls` this store holds."""
        table = self.table()
        if table is None or not urls:
            return {}
        found: dict[str, tuple[str, datetime | None]] = {}
        for part in chunks(sorted(set(urls))):
            rows = table.search().where(url_filter(part)).select(["url", "etag", "last_modified"]).to_arrow()
            found.update(
                (url, (etag, modified))
                for url, etag, modified in zip(
                    rows.column("url").to_pylist(),
                    rows.column("etag").to_pylist(),
                    rows.column("last_modified").to_pylist(),
                    strict=True,
                )
            )
        return found

    def reconcile(self, current: Mapping[str, str | None]) -> int:
        """Makes the rows of these urls agree with S3: `current` maps each to its ETag now (None: gone).
        Rows of another version are removed; returns how many. The caller tombstones the urls first."""
        return self._remove_versions(current, keep=True)

    def delete(self, urls: Iterable[str]) -> int:
        """Removes these objects from search and remembers that they are gone; returns rows removed.

        The tombstone is written first: if this stops halfway, running it again completes it.
        """
        unique = sorted(set(urls))
        self.tombstones.add(unique)
        return self.reconcile(dict.fromkeys(unique))

    def _remove_versions(self, versions: Mapping[str, str | None], keep: bool = False) -> int:
        """Deletes each url's row of the version given (None: any version), or, with `keep`, its rows of
        any other version than the one given."""
        table = self.table()
        if table is None or not versions:
            return 0
        operator = "<>" if keep else "="
        clauses = [
            f"url = {sql_text(url)}" if etag is None else f"(url = {sql_text(url)} AND etag {operator} {sql_text(etag)})"
            for url, etag in sorted(versions.items())
        ]
        removed = 0
        for start in range(0, len(clauses), 1000):
            condition = " OR ".join(clauses[start : start + 1000])
            present = table.count_rows(condition)
            if present:
                table.delete(condition)
                removed += present
        return removed

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
        nprobes, refine_factor = self.search_settings.resolve(_tuning(table))
        skip = set(exclude)
        [found] = search(table, vector[np.newaxis], nprobes, refine_factor, top + len(exclude))
        return [Match(url, value) for url, value in found if url not in skip][:top]

    def search_in_use(self) -> tuple[int, int, Tuning | None] | None:
        """(nprobes, refine_factor) a search uses now, and the measurement they come from (None if given or
        not measured yet); None while nothing is stored."""
        table = self.table()
        if table is None:
            return None
        tuning = _tuning(table)
        return (*self.search_settings.resolve(tuning), tuning)

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
        rows, fragments = table.count_rows(), fragment_count(table)
        vector_index = _vector_index(table)
        stats = None if vector_index is None else table.index_stats(vector_index.name)
        if stats is None:
            return IndexState(rows, None, 0, rows, 0, fragments)
        metadata = table.schema.field(VECTOR_COLUMN).metadata or {}
        trained = int(metadata.get(TRAINED_ROWS.encode(), b"0"))
        return IndexState(
            rows,
            stats.index_type,
            stats.num_indexed_rows,
            stats.num_unindexed_rows,
            trained,
            fragments,
            index_segments=stats.num_indices or 1,
            tuning=Tuning.from_metadata(metadata),
            code_bits=int(metadata.get(CODE_BITS.encode(), str(FIRST_CODE_BITS).encode())),
        )

    @staticmethod
    def _check_dimensions(table: LanceTable, dimensions: int, what: str) -> None:
        stored = table.schema.field(VECTOR_COLUMN).type.list_size
        if dimensions != stored:
            raise StoreError(Code.DIMENSION_MISMATCH, f"{what} has {dimensions}-d vectors; this store holds {stored}-d vectors")


def fragment_count(table: LanceTable) -> int:
    # Read from the manifest the table already holds; typed as a class, it is a dict at run time.
    stats: Any = table.stats()
    return int(stats["fragment_stats"]["num_fragments"])


def _tuning(table: LanceTable) -> Tuning | None:
    # Read from the schema the open table already holds: no request.
    return Tuning.from_metadata(table.schema.field(VECTOR_COLUMN).metadata)


def _vector_index(table: LanceTable) -> IndexConfig | None:
    return next((index for index in table.list_indices() if VECTOR_COLUMN in index.columns), None)


def shard_rows(rows: pa.Table, shard: str) -> pa.Table:
    """A worker shard's rows as the store keeps them; StoreError(bad-shard) naming what a worker shard would have."""
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


def _latest_per_url(rows: pa.Table, still_current: StillCurrent) -> pa.Table:
    # A merge whose source holds a key twice would insert it twice: keep one row a url, the newest.
    urls, etags, modified = (rows.column(name).to_pylist() for name in ("url", "etag", "last_modified"))
    newest: dict[str, int] = {}
    for row, url in enumerate(urls):
        kept = newest.get(url)
        if kept is None or _replaces((etags[row], modified[row]), (etags[kept], modified[kept]), url, still_current):
            newest[url] = row
    if len(newest) == rows.num_rows:
        return rows
    return rows.take(pa.array(sorted(newest.values()), pa.int64()))


def _decide(
    rows: pa.Table, stored: Mapping[str, tuple[str, datetime | None]], still_current: StillCurrent
) -> tuple[list[bool], list[str]]:
    """Which rows to write (those of urls not stored, and those whose version replaces the stored one),
    and the ETags S3 confirmed current on a tie, which the merge's condition lets through."""
    urls, etags, modified = (rows.column(name).to_pylist() for name in ("url", "etag", "last_modified"))
    wanted = [
        url not in stored or _replaces((etag, when), stored[url], url, still_current)
        for url, etag, when in zip(urls, etags, modified, strict=True)
    ]
    confirmed = [
        etag
        for url, etag, when, write in zip(urls, etags, modified, wanted, strict=True)
        if write and url in stored and when is not None and stored[url][1] == when
    ]
    return wanted, confirmed


def _replacing(confirmed: Sequence[str]) -> str:
    """The merge's update condition, checked again at commit against a concurrent writer's rows: another
    version, and a newer one (the rule `_replaces` applies before the merge), or on a tie one of the
    ETags S3 confirmed current."""
    newer = "source.last_modified IS NULL OR target.last_modified IS NULL OR source.last_modified > target.last_modified"
    if confirmed:
        newer += f" OR (source.last_modified = target.last_modified AND source.etag IN ({', '.join(sql_text(etag) for etag in confirmed)}))"
    return f"target.etag <> source.etag AND ({newer})"


class _Checked:
    """`still_current` that remembers the urls S3 would not answer for; each counts as not current."""

    def __init__(self, still_current: StillCurrent) -> None:
        self._ask = still_current
        self.failed: dict[str, Exception] = {}

    def __call__(self, url: str, etag: str) -> bool:
        try:
            return self._ask(url, etag)
        except Exception as exc:  # noqa: BLE001 - any refusal is that url's alone: its shard is retried (Ingested.unchecked)
            self.failed[url] = exc
            return False


def _replaces(
    candidate: tuple[str, datetime | None], kept: tuple[str, datetime | None], url: str, still_current: StillCurrent
) -> bool:
    """Whether version `candidate` of `url` replaces `kept`: another ETag, and newer; on a tie (S3 keeps
    LastModified to the second) the one S3 says is current. A version of unknown age replaces."""
    (etag, when), (kept_etag, kept_when) = candidate, kept
    if etag == kept_etag:
        return False
    if when is None or kept_when is None or when > kept_when:
        return True
    return when == kept_when and still_current(url, etag)
