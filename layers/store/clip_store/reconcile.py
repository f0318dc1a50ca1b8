"""Making the stores agree with S3 about objects that changed in a way no shard announces.

A removal (a delete, a delete marker, an expiration, or the removal of a version that uncovers an
older one), or a newest version that will never be embedded (rejected by the dispatcher, failed in
the worker): S3 is asked what is current now (one HEAD an object), and each store keeps at most
the row of that version. Every such url is tombstoned, so that no shard still on its way with
another version can bring that back; then S3 is asked again, and an object that changed meanwhile
or whose current version no store holds is reported, to be embedded again.
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
    #: Objects uploaded again while they were reconciled (their ETag changed between two HEADs).
    moved: tuple[str, ...] = ()


def reconcile(s3: Any, stores: Sequence[VectorStore], tombstones: Tombstones, urls: Iterable[str]) -> Reconciled:
    unique = sorted(set(urls))
    if not unique:
        return Reconciled()
    heads = _heads(s3, unique)
    unchecked = {url: head for url, head in heads.items() if isinstance(head, Exception)}
    current = {url: head for url, head in heads.items() if not isinstance(head, Exception)}
    if not current:
        return Reconciled(unchecked=unchecked)
    unique = sorted(current)
    # Every url is tombstoned, even one whose current version a store holds: a shard of the version
    # that was removed may still be on its way, and must not get in (a removal of the newest version
    # by id leaves an older one current, and the newer row would win).
    tombstones.add(current)
    removed = sum(store.reconcile(current) for store in stores)
    # A HEAD is a moment: an upload between it and the deletes may have been ingested and removed
    # with the rest. Asking again says which objects changed meanwhile; like the versions a removal
    # uncovered, whatever no store now holds is to be embedded again.
    again = _heads(s3, unique)
    moved = {url for url in unique if not isinstance(again[url], Exception) and again[url] != current[url]}
    now = {url: etag for url, etag in again.items() if isinstance(etag, str)}
    held = [store.versions(sorted(now)) for store in stores]
    unstored = {
        url: etag for url, etag in now.items() if not stores or any(versions.get(url, ("", None))[0] != etag for versions in held)
    }
    return Reconciled(removed, tuple(unique), unstored, unchecked, tuple(sorted(moved)))


def _heads(s3: Any, urls: Sequence[str]) -> dict[str, str | None | Exception]:
    with ThreadPoolExecutor(min(_HEAD_THREADS, len(urls))) as pool:
        return dict(zip(urls, pool.map(lambda url: _head(s3, url), urls), strict=True))


def _head(s3: Any, url: str) -> str | None | Exception:
    try:
        return current_etag(s3, url)
    except Exception as exc:  # noqa: BLE001 - any failure of one HEAD is that url's alone, reported to the caller
        return exc
