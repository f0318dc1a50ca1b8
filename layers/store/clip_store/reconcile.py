"""Making the stores agree with S3 about objects that changed in a way no shard announces.

A removal (a delete, a delete marker, an expiration, or the removal of a version that uncovers an
older one), or a newest version that will never be embedded (rejected by the dispatcher, failed in
the worker): S3 is asked what is current now (one HEAD an object), and each store keeps at most
the row of that version. A url is tombstoned unless every store already holds exactly its current
version, so that a shard still on its way with an older version cannot bring that back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from clip_store.shards import current_etag
from clip_store.store import VectorStore
from clip_store.tombstones import Tombstones

# HEADs in flight at once: a batch of a hundred removals takes a few round trips, not a hundred.
_HEAD_THREADS = 16


@dataclass(frozen=True)
class Reconciled:
    #: Rows removed, over every store.
    removed_rows: int = 0
    tombstoned: tuple[str, ...] = ()
    #: Objects that exist with a version some store does not hold (url -> ETag now): a removal
    #: uncovered an older version, which only embedding it again can bring into search.
    unstored: dict[str, str] = field(default_factory=dict)
    #: Urls S3 would not say anything about (the HEAD failed): left as they were, to be tried again.
    unchecked: dict[str, Exception] = field(default_factory=dict)


def reconcile(s3: Any, stores: Sequence[VectorStore], tombstones: Tombstones, urls: Iterable[str]) -> Reconciled:
    unique = sorted(set(urls))
    if not unique:
        return Reconciled()
    with ThreadPoolExecutor(min(_HEAD_THREADS, len(unique))) as pool:
        heads = dict(zip(unique, pool.map(lambda url: _head(s3, url), unique), strict=True))
    unchecked = {url: head for url, head in heads.items() if isinstance(head, Exception)}
    current = {url: head for url, head in heads.items() if not isinstance(head, Exception)}
    if not current:
        return Reconciled(unchecked=unchecked)
    unique = sorted(current)
    held = [store.versions(unique) for store in stores]
    agreeing = {
        url
        for url, etag in current.items()
        if etag is not None and stores and all(versions.get(url, ("", None))[0] == etag for versions in held)
    }
    changed = {url: etag for url, etag in current.items() if url not in agreeing}
    # The tombstones first: a shard ingested meanwhile sees them (or is withdrawn after its commit).
    tombstones.add(changed)
    removed = sum(store.reconcile(changed) for store in stores)
    unstored = {url: etag for url, etag in changed.items() if etag is not None}
    return Reconciled(removed, tuple(sorted(changed)), unstored, unchecked)


def _head(s3: Any, url: str) -> str | None | Exception:
    try:
        return current_etag(s3, url)
    except Exception as exc:  # noqa: BLE001 - any failure of one HEAD is that url's alone, reported to the caller
        return exc
