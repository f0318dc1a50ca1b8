"""From the worker's Parquet shards in S3 (or on disk) into a store, each shard read and checked on its own."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError

from clip_shared import aws
from clip_shared.keys import SHARD_FAILED_METADATA, bare_etag, parse_s3_url
from clip_store.errors import Code, StoreError
from clip_store.store import SHARD_COLUMNS, VECTOR_COLUMN, Ingested, StillCurrent, VectorStore, shard_rows


@dataclass(frozen=True)
class Shard:
    url: str
    rows: pa.Table
    #: Urls of the objects the worker could not embed (rejected in the worker, or failed).
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardsIngested:
    ingested: Ingested
    #: Shards left out, each with why: unreadable, not a worker shard, or of another width.
    refused: dict[str, StoreError] = field(default_factory=dict)
    #: Per shard ingested, the urls its child could not embed.
    failed: dict[str, tuple[str, ...]] = field(default_factory=dict)


def read_shard(s3: Any, url: str) -> Shard:
    """One shard's rows (the columns the store keeps, checked), from `s3://bucket/key` or a local path.

    Whatever stops it being read (missing, forbidden, throttled, truncated, not Parquet, not a worker
    shard) is a StoreError naming the shard, so that its caller can fail it alone.
    """
    try:
        if url.startswith("s3://"):
            bucket, key = parse_s3_url(url)
            source: Any = io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        else:
            source = url
        table = pq.read_table(source)
    except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as exc:
        raise StoreError(Code.SHARD_UNAVAILABLE, f"shard {url} could not be fetched ({aws.error_code(exc)}): {exc}") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(Code.BAD_SHARD, f"shard {url} cannot be read as a worker shard: {exc}") from exc
    rows = table.select([name for name in SHARD_COLUMNS if name in table.column_names])
    try:
        failed = json.loads((table.schema.metadata or {}).get(SHARD_FAILED_METADATA, b"[]"))
        return Shard(url, shard_rows(rows, url), tuple(str(failed_url) for failed_url in failed))
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise StoreError(Code.BAD_SHARD, f"shard {url} is not a worker shard: {exc}") from exc


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
    store: VectorStore, s3: Any, shard_urls: Sequence[str], still_current: StillCurrent | None = None
) -> ShardsIngested:
    """Several finished shards, oldest first, in one commit (fewer, larger fragments than one each).

    Each shard is read and checked on its own: one that cannot be read, is not a worker shard, or
    holds vectors of another width than the store's (or than most of the batch's, for a new store)
    is left out and named in `refused`, so that it holds up no other.
    """
    shards: list[Shard] = []
    refused: dict[str, StoreError] = {}
    for url in shard_urls:
        try:
            shards.append(read_shard(s3, url))
        except StoreError as error:
            refused[url] = error
    width = store.dimensions() or _most_common_width(shards)
    fitting = []
    for shard in shards:
        found = shard.rows.schema.field(VECTOR_COLUMN).type.list_size
        if found == width:
            fitting.append(shard)
        else:
            refused[shard.url] = StoreError(
                Code.DIMENSION_MISMATCH, f"shard {shard.url} has {found}-d vectors; this store holds {width}-d vectors"
            )
    if not fitting:
        return ShardsIngested(Ingested(0, 0, 0, 0), refused)
    rows = pa.concat_tables([shard.rows for shard in fitting])
    ingested = store.ingest(rows, shard="", still_current=still_current or s3_still_current(s3))
    unchecked = set(ingested.unchecked)
    for shard in fitting:
        # Its other rows are in; it is tried again for the rows S3 would not let the store check.
        if blocked := sorted(unchecked.intersection(shard.rows.column("url").to_pylist())):
            refused[shard.url] = StoreError(
                Code.UNCHECKED, f"shard {shard.url}: S3 would not say whether {', '.join(blocked[:3])} is current (a HEAD failed)"
            )
    return ShardsIngested(ingested, refused, {shard.url: shard.failed for shard in fitting if shard.failed})


def _most_common_width(shards: Sequence[Shard]) -> int | None:
    widths = Counter(shard.rows.schema.field(VECTOR_COLUMN).type.list_size for shard in shards)
    return widths.most_common(1)[0][0] if widths else None
