"""One trainer of a store's index at a time, across indexer containers and `clip-pipeline index`.

Two indexer containers run at once (SQS's MaximumConcurrency cannot go below 2), and a build or
retrain falls due in both when the table passes a threshold: without a lease both would train the
same index, each for minutes. The lease is an object created only if it is absent (S3's
`If-None-Match: *`); its holder deletes it when done. A holder that died leaves it behind: past
`ttl` (longer than any training a Lambda can run) the next one takes it over, conditionally on the
ETag it saw (`If-Match`), so of two taking over at once one wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from clip_shared import aws
from clip_shared.keys import parse_s3_url

#: Longer than a Lambda's 15 minutes, the longest a holder in the indexer can live.
TTL = timedelta(minutes=20)


class S3Lease:
    def __init__(self, s3: Any, url: str, ttl: timedelta = TTL) -> None:
        self._s3 = s3
        self._bucket, self._key = parse_s3_url(url)
        self._ttl = ttl

    @contextmanager
    def hold(self) -> Iterator[bool]:
        """Yields whether this caller holds the lease; releases it after if so."""
        held = self.take()
        try:
            yield held
        finally:
            if held:
                self.release()

    def release(self) -> None:
        self._s3.delete_object(Bucket=self._bucket, Key=self._key)

    def take(self, note: str = "") -> bool:
        """Whether this caller now holds the lease (kept until `release`, or until it expires);
        `note` is written in it, for whoever looks at who holds it."""
        body = f"{datetime.now(UTC).isoformat()} {note}".strip().encode()
        try:
            self._s3.put_object(Bucket=self._bucket, Key=self._key, Body=body, IfNoneMatch="*")
            return True
        except Exception as exc:
            if not aws.lost_race(exc):
                raise
        try:
            held = self._s3.head_object(Bucket=self._bucket, Key=self._key)
        except Exception as exc:
            if aws.is_missing(exc):  # released meanwhile: the next call takes it
                return False
            raise
        if datetime.now(UTC) - held["LastModified"] < self._ttl:
            return False
        try:
            self._s3.put_object(Bucket=self._bucket, Key=self._key, Body=body, IfMatch=held["ETag"])
            return True
        except Exception as exc:
            if aws.lost_race(exc):
                return False
            raise
