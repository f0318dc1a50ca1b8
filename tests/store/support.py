"""Worker shards of made-up vectors, for the store's tests."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from lancedb.table import LanceTable

from clip_store.store import VectorStore
from clip_store.tombstones import TABLE as TOMBSTONES
from clip_worker.writer import shard_schema
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET


def unit_vectors(count: int, dimensions: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered(count: int, dimensions: int, seed: int, clusters: int = 20) -> np.ndarray:
    """Unit vectors around a few centres, as CLIP embeddings of similar images are."""
    rng = np.random.default_rng(seed)
    centres = unit_vectors(clusters, dimensions, seed=1000)  # the same centres whatever the seed
    vectors = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, dimensions)).astype(
        np.float32
    ) / np.sqrt(dimensions)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def urls(names: Sequence[str]) -> list[str]:
    return [f"s3://{INPUT_BUCKET}/{name}" for name in names]


def shard(
    names: Sequence[str],
    vectors: np.ndarray,
    etags: Sequence[str] | str = "etag-1",
    modified: Sequence[datetime | None] | None = None,
) -> pa.Table:
    """Rows exactly as clip_worker.writer writes them into a Parquet shard (`modified`: S3's LastModified)."""
    etags = [etags] * len(names) if isinstance(etags, str) else list(etags)
    return pa.table(
        {
            "url": urls(names),
            "bucket": [INPUT_BUCKET] * len(names),
            "key": list(names),
            "version_id": pa.nulls(len(names), pa.string()),
            "etag": etags,
            "last_modified": list(modified) if modified is not None else [None] * len(names),
            "model": ["test-tiny-clip"] * len(names),
            "pretrained": ["none"] * len(names),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        },
        schema=shard_schema(vectors.shape[1]),
    )


def put_shard(table: pa.Table, key: str) -> str:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    boto3.client("s3").put_object(Bucket=OUTPUT_BUCKET, Key=key, Body=buffer.getvalue())
    return f"s3://{OUTPUT_BUCKET}/{key}"


def trusting(url: str, etag: str) -> bool:
    """still_current for tests without deletions: every row is current."""
    return True


def stored(store: VectorStore, url: str) -> np.ndarray:
    vector = store.vector_of(url)
    assert vector is not None, f"{url} is not in the store"
    return vector


def table_of(store: VectorStore) -> LanceTable:
    """The store's vectors table, which the test has written to (so it exists)."""
    table = store.table()
    assert table is not None, f"{store.uri} has no vectors table"
    return table


def tombstone_count(store: VectorStore) -> int:
    table = store.tombstones.database.table(TOMBSTONES)
    return 0 if table is None else table.count_rows()
