"""One cold search, in the fresh process search_bench starts for it:

    python -m bench.search_cold store '<settings json>'    open a store, first query, then warm ones
    python -m bench.search_cold memory '<settings json>'   today's path: load the shard, first query

Times are CLOCK_MONOTONIC (time.monotonic), which is system-wide on Linux, so the parent can match
them with the requests its S3 proxy recorded. Results go to the settings' `out` file as JSON.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()

import json  # noqa: E402 - after the clock starts, as everything here
import sys  # noqa: E402 - after the clock starts
from typing import Any  # noqa: E402 - after the clock starts

import numpy as np  # noqa: E402 - after the clock starts


def peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork and exec.
    with open("/proc/self/status") as stream:
        peak_kib = next(int(line.split()[1]) for line in stream if line.startswith("VmHWM:"))
    return peak_kib * 1024 / 1e6


def store(settings: dict[str, Any]) -> dict[str, Any]:
    """Optional settings: `prewarm`; `index_cache_mb` (the query function's SEARCH_INDEX_CACHE_MB, else
    its default); `nprobes` and `refine_factor` (else those the store measured)."""
    from clip_store.database import INDEX_CACHE_BYTES
    from clip_store.store import SearchSettings, VectorStore

    imported = time.monotonic()
    queries = np.load(settings["queries"])
    opened = time.monotonic()
    # A query Lambda's reader: opened lazily, caching what it reads, checking for commits every minute.
    reader = VectorStore(
        settings["uri"],
        refresh_s=60,
        search=SearchSettings(settings.get("nprobes"), settings.get("refine_factor")),
        index_cache_bytes=settings.get("index_cache_mb", INDEX_CACHE_BYTES // 2**20) * 2**20,
    )
    if settings.get("prewarm"):
        reader.prewarm()
    prewarmed = time.monotonic()
    found = reader.nearest(queries[0], settings["top"])
    first = time.monotonic()
    warm: list[tuple[float, float]] = []
    for query in queries[1 : 1 + settings["warm"]]:
        before = time.monotonic()
        reader.nearest(query, settings["top"])
        warm.append((before, time.monotonic()))
    return {
        "import_s": imported - STARTED,
        "prewarm_s": prewarmed - opened,
        "first_query_s": first - opened,
        "first_query_window": [opened, first],
        "warm_windows": warm,
        "first_urls": [match.url for match in found],
        "peak_rss_mb": peak_rss_mb(),
    }


def memory(settings: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from bench.in_memory_index import VectorIndex

    imported = time.monotonic()
    query = np.load(settings["queries"])[0]
    index = VectorIndex.from_tables([pq.read_table(settings["shard"], columns=["url", "vector"])])
    loaded = time.monotonic()
    found = index.nearest(query, settings["top"])
    return {
        "import_s": imported - STARTED,
        "load_s": loaded - imported,
        "first_query_s": time.monotonic() - imported,
        "first_urls": [match.url for match in found],
        "peak_rss_mb": peak_rss_mb(),
    }


if __name__ == "__main__":
    mode, raw = sys.argv[1], sys.argv[2]
    settings = json.loads(raw)
    results = {"store": store, "memory": memory}[mode](settings)
    with open(settings["out"], "w") as stream:
        json.dump(results, stream)
