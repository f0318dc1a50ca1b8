"""Where everything lives in the output bucket: the one place keys and prefixes are built.

Keys are deterministic, so a re-run overwrites instead of duplicating. Per job child (the default):

    {prefix}parquet/{model_id}/{manifest_id}/shard-00000.parquet   the child's vectors, one row per embedded image
    {prefix}events/{model_id}/{manifest_id}/shard-00000.json       its CloudEvents batch: created and failed,
                                                                   counted in its S3 metadata (EVENTS_OUTCOMES_METADATA)

Per object, rare or optional:

    {prefix}rejected/dispatcher/{bucket}/{key}.json      the dispatcher's document-rejected event
    {prefix}vectors/{model_id}/{bucket}/{key}.json       the vector, a JSON array (PER_OBJECT_OUTPUTS)
    {prefix}documents/{model_id}/{bucket}/{key}.json     its CloudEvent (PER_OBJECT_OUTPUTS)

And what the pipeline keeps for itself:

    {prefix}manifests/{manifest_id}/shard-00000.json     what each job child embeds
    {prefix}journal/{manifest_id}/shard-00000.json       what a job child had in flight (crash recovery)
    {prefix}retries/{sha256}.json                         one per failure `clip-pipeline retry` resubmitted
    {prefix}store/{model_id}/                             the vector store (LanceDB) search reads, one per model
    {prefix}store/{model_id}/_training.lease              held while one process trains that store's index
    {prefix}tombstones/                                   removed objects, which every model's store consults

Per-object keys keep the source bucket and key verbatim, which makes the mapping injective: two
different inputs never share an output. S3 keys are limited to 1024 bytes; a source key too long
to fit is stored under `_long/<sha256 of bucket/key>` instead, and since bucket names cannot start
with an underscore that namespace cannot collide with a verbatim one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import unquote_plus

MAX_KEY_BYTES = 1024
#: A shard's Parquet key-value metadata naming, as a JSON list of urls, the objects its child could
#: not embed: the vector store removes their older versions' vectors (clip_store.reconcile).
SHARD_FAILED_METADATA = b"clip.failed"
#: A shard's Parquet metadata key for the output contract's version (events.SCHEMA_VERSION).
SHARD_SCHEMA_METADATA = b"clip.schema_version"
#: An events batch's S3 user metadata (x-amz-meta-clip-outcomes) counting what the batch holds, as
#: JSON: `{"created": 998, "failed": {"corrupt-image": 2}}`. Written by the same PUT as the batch, so
#: it never disagrees with it, and read with a HEAD: counting a child's outcomes costs one small
#: request however many images it held.
EVENTS_OUTCOMES_METADATA = "clip-outcomes"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: CLIP_PRETRAINED value for random weights (smoke tests only).
RANDOM_WEIGHTS = "none"


def normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


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


def _shard(index: int) -> str:
    return f"shard-{index:05d}"


def parquet_prefix(prefix: str, model: str) -> str:
    return f"{normalise_prefix(prefix)}parquet/{model}/"


def parquet_key(prefix: str, model: str, manifest_id: str, shard_index: int) -> str:
    return f"{parquet_prefix(prefix, model)}{manifest_id}/{_shard(shard_index)}.parquet"


def events_prefix(prefix: str, model: str) -> str:
    return f"{normalise_prefix(prefix)}events/{model}/"


def events_key(prefix: str, model: str, manifest_id: str, shard_index: int) -> str:
    """A job child's CloudEvents batch document."""
    return f"{events_prefix(prefix, model)}{manifest_id}/{_shard(shard_index)}.json"


def rejected_prefix(prefix: str) -> str:
    return f"{normalise_prefix(prefix)}rejected/"


def rejection_key(prefix: str, bucket: str, key: str) -> str:
    # Rejections do not depend on the model; the scope segment keeps the layout uniform.
    return _per_object(prefix, "rejected", "dispatcher", bucket, key)


def vector_key(prefix: str, model: str, bucket: str, key: str) -> str:
    return _per_object(prefix, "vectors", model, bucket, key)


def document_key(prefix: str, model: str, bucket: str, key: str) -> str:
    """One object's own CloudEvent, written besides the batch when per-object outputs are on."""
    return _per_object(prefix, "documents", model, bucket, key)


def stores_prefix(prefix: str) -> str:
    return f"{normalise_prefix(prefix)}store/"


def store_prefix(prefix: str, model: str) -> str:
    return f"{stores_prefix(prefix)}{model}/"


def training_lease_key(prefix: str, model: str) -> str:
    return f"{store_prefix(prefix, model)}_training.lease"


def training_job_key(prefix: str, model: str) -> str:
    """Held while an AWS Batch job is to train a store's index: one job per due training."""
    return f"{store_prefix(prefix, model)}_training.job"


def tombstones_prefix(prefix: str) -> str:
    return f"{normalise_prefix(prefix)}tombstones/"


def model_of_shard(prefix: str, key: str) -> str | None:
    """The model a worker's Parquet shard key belongs to, or None for any other key."""
    head = f"{normalise_prefix(prefix)}parquet/"
    if not key.startswith(head) or not key.endswith(".parquet"):
        return None
    model, _, rest = key.removeprefix(head).partition("/")
    return model if model and rest else None


def manifest_prefix(prefix: str, manifest_id: str) -> str:
    """What a job's MANIFEST_URI names: child i reads `shard-{i:05d}.json` under it."""
    return f"{normalise_prefix(prefix)}manifests/{manifest_id}/"


def manifest_shard_name(shard_index: int) -> str:
    return f"{_shard(shard_index)}.json"


def journal_key(prefix: str, manifest_id: str, shard_index: int) -> str:
    return f"{normalise_prefix(prefix)}journal/{manifest_id}/{_shard(shard_index)}.json"


def retry_key(prefix: str, url: str, failure_id: str) -> str:
    """Names one failure of one object (the event that recorded it, or the job that died with it)."""
    digest = hashlib.sha256(f"{url}\0{failure_id}".encode()).hexdigest()
    return f"{normalise_prefix(prefix)}retries/{digest}.json"


def bare_etag(etag: str) -> str:
    """S3 quotes ETags in HTTP headers but not in event notifications; they are compared bare."""
    return etag.strip('"')


def notified_key(encoded: str) -> str:
    """An object key as S3 notifications carry it (URL-encoded, spaces as `+`), decoded."""
    return unquote_plus(encoded)


def s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), the inverse of `s3_url`; raises ValueError naming the URL otherwise.

    Everything after the first `/` that follows the bucket is the key, byte for byte: S3 keys may
    hold `#`, `?`, `;`, tabs and leading or doubled slashes, which a URL parser would take for a
    fragment, a query or a path to normalise (and `photo#1.jpg` would become `photo`).
    """
    scheme, separator, rest = url.partition("://")
    bucket, slash, key = rest.partition("/")
    if scheme != "s3" or not separator or not bucket or not slash or not key:
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return bucket, key
