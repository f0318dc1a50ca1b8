"""One LanceDB database (a folder, or a prefix of the output bucket) and its tables, opened lazily.

Shared by a model's store (its `vectors` table) and the tombstones every model's store consults.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import cast

import lancedb
import pyarrow as pa
from lancedb.table import LanceTable

from clip_store.location import StorageSettings

# Urls per SQL `IN (...)` filter: keeps each statement small whatever the batch.
_FILTER_URLS = 1000

#: What LanceDB may keep in memory in this process, for every database it opens: the index partitions
#: searches have read, and table metadata. Its defaults (6 GB and 1 GB) would let a warm query function
#: cache the whole index of a big store (4-bit codes: 2.8 GB at 10M vectors) and be killed for it;
#: bounded, a search past the cache reads the partitions again (docs/search.md, "Query memory is bounded":
#: 715 MB after 600 queries at 10M with these, 1,069 MB with a 512 MB index cache). A reader given the
#: memory may hold a big store's whole index instead (the query function's SEARCH_INDEX_CACHE_MB).
INDEX_CACHE_BYTES = 256 * 1024 * 1024
METADATA_CACHE_BYTES = 128 * 1024 * 1024
_SESSIONS: dict[int, lancedb.Session] = {}
_SESSIONS_LOCK = threading.Lock()


def session(index_cache_bytes: int = INDEX_CACHE_BYTES) -> lancedb.Session:
    """The process's one LanceDB session (its caches) for that index cache bound: every connection with
    the same bound shares its cache and what it has read."""
    with _SESSIONS_LOCK:
        if index_cache_bytes not in _SESSIONS:
            _SESSIONS[index_cache_bytes] = lancedb.Session(
                index_cache_size_bytes=index_cache_bytes, metadata_cache_size_bytes=METADATA_CACHE_BYTES
            )
        return _SESSIONS[index_cache_bytes]


def sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def url_filter(urls: Sequence[str]) -> str:
    return f"url IN ({', '.join(sql_text(url) for url in urls)})"


def chunks(items: Sequence[str], size: int = _FILTER_URLS) -> Iterable[Sequence[str]]:
    return (items[start : start + size] for start in range(0, len(items), size))


class Database:
    """`refresh_s` is how stale a reader may be: it checks for commits newer than the version it
    holds at most that often (0: before every call, as writers must; None: never, for a one-shot
    command). `index_cache_bytes` bounds what the process keeps of the indexes it has read (`session`).
    Safe to share between threads."""

    def __init__(
        self,
        uri: str,
        *,
        settings: StorageSettings | None = None,
        refresh_s: float | None = 0,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
    ) -> None:
        self.uri = uri
        self._db = lancedb.connect(
            uri,
            storage_options=(settings or StorageSettings.from_env()).options(uri),
            read_consistency_interval=None if refresh_s is None else timedelta(seconds=refresh_s),
            session=session(index_cache_bytes),
        )
        self._lock = threading.Lock()
        self._tables: dict[str, LanceTable] = {}

    def table(self, name: str) -> LanceTable | None:
        """The open table, or None while nothing has been written to it."""
        with self._lock:
            if name not in self._tables:
                try:
                    # A folder or object-store connection opens LanceTables (typed as the abstract Table).
                    self._tables[name] = cast(LanceTable, self._db.open_table(name))
                except ValueError:  # LanceDB's "was not found"; other failures (network, access) propagate
                    return None
            return self._tables[name]

    def created(self, name: str, schema: pa.Schema) -> LanceTable:
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
