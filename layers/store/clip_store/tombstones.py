"""Tombstones: the urls whose stored vector must agree with S3 before a shard may add one.

A url is tombstoned when S3 says its object changed in a way no shard will announce: it was
removed (deleted, a delete marker, expired), a removal uncovered an older version, or its newest
version was rejected by the dispatcher or failed in the worker. A shard embedded before that (late,
redelivered, or of an older version) must not bring the old picture back, so a tombstoned url's row
is ingested only if the object exists now with that row's ETag (`StillCurrent`, one HEAD). A
tombstone stays when its url comes back: a redelivered shard of the removed version must still be
refused (a removal of the newest version uncovers an older one, and the newer row would win).

One table serves every model's store (the indexer's `tombstones_uri`): a removal is a fact about
the bucket, so it holds for a model whose store does not exist yet when the removal arrives.
Tombstones older than `IndexPolicy.keep_tombstones` are forgotten: by then no shard embedded
before them can still arrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import pyarrow as pa

from clip_store.database import Database, chunks, url_filter

TABLE = "deletions"
# Lance's schema marker for an (unenforced) primary key; merge_insert's conflict check uses it.
PRIMARY_KEY = {"lance-schema:unenforced-primary-key": "true"}
SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False, metadata=PRIMARY_KEY),
        pa.field("deleted_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _sql_time(when: datetime) -> str:
    return f"TIMESTAMP '{when.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')}'"


class Tombstones:
    def __init__(self, database: Database) -> None:
        self.database = database

    def add(self, urls: Iterable[str]) -> None:
        """Tombstones these urls now (a url tombstoned again gets the new time)."""
        unique = sorted(set(urls))
        if not unique:
            return
        now = pa.array([datetime.now(UTC)] * len(unique), SCHEMA.field("deleted_at").type)
        rows = pa.table({"url": unique, "deleted_at": now}, schema=SCHEMA)
        table = self.database.created(TABLE, SCHEMA)
        table.merge_insert("url").when_matched_update_all().when_not_matched_insert_all().execute(rows)

    def of(self, urls: Sequence[str]) -> dict[str, datetime]:
        """The tombstoned ones among `urls`, with when each was tombstoned."""
        table = self.database.table(TABLE)
        if table is None or not urls or not table.count_rows():
            return {}
        found: dict[str, datetime] = {}
        for part in chunks(sorted(set(urls))):
            rows = table.search().where(url_filter(part)).select(["url", "deleted_at"]).to_arrow()
            found.update(zip(rows.column("url").to_pylist(), rows.column("deleted_at").to_pylist(), strict=True))
        return found

    def forget(self, before: datetime) -> None:
        """Drops tombstones older than `before` (maintain.py decides when)."""
        table = self.database.table(TABLE)
        stale = f"deleted_at < {_sql_time(before)}"
        if table is not None and table.count_rows(stale):
            table.delete(stale)
