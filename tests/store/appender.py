"""One Batch array child finishing, as a separate process: imports only what an appender needs."""

from __future__ import annotations

import boto3

from clip_store.shards import ingest_shards
from clip_store.store import Ingested, VectorStore


def append_one_shard(uri: str, shard_url: str) -> Ingested:
    return ingest_shards(VectorStore(uri), boto3.client("s3"), [shard_url]).ingested
