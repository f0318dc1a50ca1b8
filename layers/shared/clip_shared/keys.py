"""Where every output lives. Keys are deterministic, so a re-run overwrites instead of duplicating.

    {prefix}vectors/{model_id}/{bucket}/{key}.json        the vector, a JSON array of floats
    {prefix}events/{model_id}/{bucket}/{key}.json         its CloudEvents document (created or failed)
    {prefix}parquet/{model_id}/{manifest_id}/shard-00000.parquet   one columnar shard per job child
    {prefix}rejected/{bucket}/{key}.json                  the dispatcher's rejection record
    {prefix}manifests/{manifest_id}.json                  the manifest a job embeds
    {prefix}journal/{manifest_id}/shard-00000.json        what a job child has in flight (crash recovery)
    {prefix}retries/{sha256}.json                         one per failure `clip-pipeline retry` resubmitted

The source bucket and key are kept verbatim, which makes the mapping injective: two different
inputs never share an output. S3 keys are limited to 1024 bytes; a source key too long to fit
is stored under `_long/<sha256 of bucket/key>` instead, and since bucket names cannot start
with an underscore that namespace cannot collide with a verbatim one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import urlparse

MAX_KEY_BYTES = 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


#: CLIP_PRETRAINED value for random weights (smoke tests only).
RANDOM_WEIGHTS = "none"


def weights_id(pretrained: str) -> str:
    """Names the weights: the tag itself, `random`, or a checkpoint file by its content.

    Naming a checkpoint by content means retrained weights saved under the same file name never
    pass for the old ones when finished work is skipped.
    """
    if pretrained.lower() == RANDOM_WEIGHTS:
        return "random"
    path = Path(pretrained)
    if not path.is_file():
        return pretrained
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def model_id(model: str, pretrained: str) -> str:
    """One path segment naming the model and its weights, e.g. `ViT-B-32__openai`."""
    return f"{_UNSAFE.sub('-', model)}__{_UNSAFE.sub('-', weights_id(pretrained))}"


def _per_object(prefix: str, kind: str, scope: str, bucket: str, key: str) -> str:
    head = f"{normalise_prefix(prefix)}{kind}/{scope}/"
    verbatim = f"{head}{bucket}/{key}.json"
    if len(verbatim.encode()) <= MAX_KEY_BYTES:
        return verbatim
    digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
    return f"{head}_long/{digest}.json"


def vector_key(prefix: str, model: str, bucket: str, key: str) -> str:
    return _per_object(prefix, "vectors", model, bucket, key)


def event_key(prefix: str, model: str, bucket: str, key: str) -> str:
    return _per_object(prefix, "events", model, bucket, key)


def rejection_key(prefix: str, bucket: str, key: str) -> str:
    # Rejections do not depend on the model; the scope segment keeps the layout uniform.
    return _per_object(prefix, "rejected", "dispatcher", bucket, key)


def parquet_key(prefix: str, model: str, manifest_id: str, shard_index: int) -> str:
    return f"{normalise_prefix(prefix)}parquet/{model}/{manifest_id}/shard-{shard_index:05d}.parquet"


def journal_key(prefix: str, manifest_id: str, shard_index: int) -> str:
    return f"{normalise_prefix(prefix)}journal/{manifest_id}/shard-{shard_index:05d}.json"


def retry_key(prefix: str, url: str, failure_id: str) -> str:
    """Names one failure of one object (the event that recorded it, or the job that died with it)."""
    digest = hashlib.sha256(f"{url}\0{failure_id}".encode()).hexdigest()
    return f"{normalise_prefix(prefix)}retries/{digest}.json"


def manifest_key(prefix: str, manifest_id: str) -> str:
    return f"{normalise_prefix(prefix)}manifests/{manifest_id}.json"


def bare_etag(etag: str) -> str:
    """S3 quotes ETags in HTTP headers but not in event notifications; they are compared bare."""
    return etag.strip('"')


def s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); raises ValueError naming the URL otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.lstrip("/"):
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")
