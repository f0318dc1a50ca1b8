"""The search the vector store replaced, kept as the benchmarks' baseline: every vector in memory.

The shards were the index: one matrix of unit vectors, so cosine similarity is a dot product.
Ranking runs in fixed-size chunks, which keeps memory flat however many vectors there are.
(bench/search_bench.py measures clip_store against it; nothing in the pipeline uses it.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clip_store import Match

_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class VectorIndex:
    urls: list[str]
    #: (n, dimensions) float32, each row L2-normalised.
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.urls)

    @classmethod
    def from_tables(cls, tables: Iterable[pa.Table]) -> VectorIndex:
        """Later tables win: an image embedded again (new version, re-run) appears once, newest vector."""
        non_empty = [table.select(["url", "vector"]) for table in tables if table.num_rows]
        if not non_empty:
            return cls([], np.zeros((0, 0), np.float32))
        table = pa.concat_tables(non_empty)
        dimensions = table.schema.field("vector").type.list_size
        urls = table.column("url").to_pylist()
        # A dict keeps each url's last row; the matrix is gathered once, without a copy per row.
        last_row = {url: row for row, url in enumerate(urls)}
        rows = np.fromiter(last_row.values(), dtype=np.int64, count=len(last_row))
        matrix = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dimensions)
        return cls(list(last_row), matrix[rows] if len(rows) < len(urls) else matrix)

    def vector_of(self, url: str) -> np.ndarray | None:
        try:
            return self.vectors[self.urls.index(url)]
        except ValueError:
            return None

    def nearest(self, query: np.ndarray, top: int) -> list[Match]:
        if not len(self) or top < 1:
            return []
        query = (query / np.linalg.norm(query)).astype(np.float32)
        best_scores = np.empty(0, np.float32)
        best_rows = np.empty(0, np.int64)
        for start in range(0, len(self), _CHUNK_ROWS):
            scores = self.vectors[start : start + _CHUNK_ROWS] @ query
            keep = min(top, scores.size)
            rows = np.argpartition(-scores, keep - 1)[:keep]
            best_scores = np.concatenate([best_scores, scores[rows]])
            best_rows = np.concatenate([best_rows, rows + start])
            if best_scores.size > top:
                survivors = np.argpartition(-best_scores, top - 1)[:top]
                best_scores, best_rows = best_scores[survivors], best_rows[survivors]
        order = np.argsort(-best_scores, kind="stable")
        return [Match(self.urls[best_rows[i]], float(best_scores[i])) for i in order]
