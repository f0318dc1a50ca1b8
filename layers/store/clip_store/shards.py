"""From the worker's Parquet shards in S3 (or on disk) into a store."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clip_shared import aws
from clip_shared.keys import bare_etag, parse_s3_url
from clip_store.errors import Code, StoreError
from clip_store.store import SHARD_COLUMNS, Ingested, StillCurrent, VectorStore


def read_shard(s3: Any, url: str) -> pa.Table:
    """One shard's rows (the columns the store keeps), from `s3://bucket/key` or a local path."""
    try:
        if url.startswith("s3://"):
            bucket, key = parse_s3_url(url)
            source: Any = io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        else:
            source = url
        return pq.read_table(source, columns=list(SHARD_COLUMNS))
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise StoreError(Code.BAD_SHARD, f"shard {url} cannot be read as a worker shard: {exc}") from exc


def current_etag(s3: Any, url: str) -> str | None:
    """The ETag of the object at `url` now (one HEAD), or None if it is gone: in a versioned bucket,
    removing an old version leaves the object, and a delete marker makes it gone."""
    bucket, key = parse_s3_url(url)
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if aws.is_missing(exc):
            return None
        raise
    return bare_etag(head["ETag"])


def s3_still_current(s3: Any) -> StillCurrent:
    """Asks S3 (one HEAD) whether the object a tombstoned row was embedded from is back, unchanged."""
    return lambda url, etag: current_etag(s3, url) == etag


def ingest_shards(
    store: VectorStore,
    s3: Any,
    shard_urls: Sequence[str],
    still_current: StillCurrent | None = None,
    unreadable: dict[str, StoreError] | None = None,
) -> Ingested:
    """Several finished shards, oldest first, in one commit (fewer, larger fragments than one each).

    A shard that cannot be read raises StoreError(bad-shard), unless `unreadable` is given: then it
    is left out and its error kept there under its url, so one bad shard does not hold up the others.
    """
    tables = []
    for url in shard_urls:
        try:
            tables.append(_with_source(read_shard(s3, url), url))
        except StoreError as error:
            if unreadable is None:
                raise
            unreadable[url] = error
    if not tables:
        return Ingested(0, 0, 0, 0)
    rows = pa.concat_tables(tables, promote_options="permissive")
    return store.ingest(rows, shard="", still_current=still_current or s3_still_current(s3))


def _with_source(rows: pa.Table, url: str) -> pa.Table:
    return rows.append_column("shard", pa.array([url] * rows.num_rows, pa.string()))
