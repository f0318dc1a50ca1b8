"""The benchmarks' baseline, the in-memory search the vector store replaced, ranks as a full sort would."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from bench import in_memory_index as index_module
from bench.in_memory_index import VectorIndex
from clip_worker.writer import shard_schema


def shard(rows: dict[str, list[float]]) -> pa.Table:
    dimensions = len(next(iter(rows.values())))
    vectors = np.asarray(list(rows.values()), np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pa.table(
        {
            "url": list(rows),
            "bucket": ["in"] * len(rows),
            "key": [url.rsplit("/", 1)[-1] for url in rows],
            "version_id": [None] * len(rows),
            "etag": ["e"] * len(rows),
            "last_modified": [None] * len(rows),
            "model": ["m"] * len(rows),
            "pretrained": ["p"] * len(rows),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dimensions),
        },
        schema=shard_schema(dimensions),
    )


def test_nearest_ranks_by_cosine_and_the_newest_shard_wins() -> None:
    shards: list[dict[str, list[float]]] = [
        {"s3://in/red": [1, 0, 0], "s3://in/green": [0, 1, 0], "s3://in/blue": [0, 0, 1]},
        {"s3://in/red": [0, 0.2, 1], "s3://in/purple": [1, 0, 1]},  # red was re-embedded later
    ]

    found = VectorIndex.from_tables(shard(rows) for rows in shards)
    assert len(found) == 4
    matches = found.nearest(np.array([1, 0, 0.1], np.float32), top=2)
    # If the old red [1, 0, 0] had survived, it would rank first.
    assert [m.url for m in matches] == ["s3://in/purple", "s3://in/blue"]
    assert [m.url for m in found.nearest(np.array([0, 0.1, 1.0]), top=3)][:2] == ["s3://in/red", "s3://in/blue"]
    assert found.nearest(np.array([0, 0, 1.0]), top=10)[0].score <= 1.0 + 1e-6


def test_chunked_ranking_equals_a_full_sort(monkeypatch: Any) -> None:
    monkeypatch.setattr(index_module, "_CHUNK_ROWS", 7)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(100, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    idx = VectorIndex([f"u{i}" for i in range(100)], vectors)
    query = rng.normal(size=16).astype(np.float32)
    expected = np.argsort(-(vectors @ (query / np.linalg.norm(query))))[:10]
    assert [m.url for m in idx.nearest(query, 10)] == [f"u{i}" for i in expected]
