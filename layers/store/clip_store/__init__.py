"""The vector store: every embedded image's vector in LanceDB, searched through an ANN index.

One store per model, a LanceDB database at a local folder or at `store_uri(bucket, prefix,
model_id)` = `s3://{output bucket}/{prefix}store/{model_id}` (docs/search.md has the layout, the
ingestion design, the index policy, deletions, consistency and costs). The worker image, the query
image and the CLI ship this package; the dispatcher's zip layer does not (lancedb is 180 MB).

What each caller does:

    from clip_store import VectorStore, store_uri, ingest_shards, maintain

    # The indexer (one writer; S3 notifications of finished shards and of removed inputs):
    tombstones = Tombstones(Database(tombstones_uri(bucket, prefix)))  # one for every model's store
    store = VectorStore(store_uri(bucket, prefix, model_id), tombstones=tombstones)  # refresh_s=0: sees every commit
    done = ingest_shards(store, s3, ["s3://out/parquet/m/job/shard-00000.parquet", ...])  # one commit, idempotent
    reconcile(s3, [store], tombstones, ["s3://input/cat.jpg", *failed])  # removed or changed in S3: rows agree
    maintain(store, policy, S3Lease(s3, lease_url), text_probes)        # builds/updates/retrains/compacts, measures recall
    submit_training(s3, batch, TrainingJobs(queue, definition), ...)    # a training past the Lambda's bound: a Batch job

    # The query API (one store object per container, opened on the first /search):
    store = VectorStore(uri, refresh_s=config.index_refresh_s)          # sees new commits within refresh_s
    store.prewarm()                                                     # optional, at init: the index into cache
    store.nearest(text_vector, k)         -> list[Match(url, score)]    # score = cosine, best first
    store.count()                         -> int                        # `indexed` in the answers

    # clip-pipeline search / similar (one-shot):
    store = VectorStore(uri, refresh_s=None)
    vector = store.vector_of("s3://input/cat.jpg")                      # None if not stored
    store.nearest(vector, top, exclude=["s3://input/cat.jpg"])

API, in one line each:

- `store_uri(bucket, prefix, model_id) -> str`: where a model's store lives in the output bucket;
  `stored_models(s3, bucket, prefix) -> list[str]`: the models that have one.
- `VectorStore(uri, *, settings=StorageSettings.from_env(), refresh_s=0, search=SearchSettings(),
  index_cache_bytes=256 MiB)`: opens nothing until used; `search` settings left None are the measured
  ones (recall.py); `settings` maps AWS_ENDPOINT_URL/AWS_REGION to LanceDB's S3 options;
  `index_cache_bytes` bounds what the process keeps of the index it has read (database.session).
- `VectorStore.ingest(rows, *, shard, still_current) -> Ingested(inserted, updated, unchanged,
  skipped_deleted)`: upserts a worker shard's rows on `url` in one commit.
- `ingest_shards(store, s3, shard_urls, still_current=s3_still_current(s3)) -> ShardsIngested(ingested,
  refused, failed)`: reads finished Parquet shards (s3:// or local paths), each checked on its own,
  and ingests the good ones together; `refused` names each shard left out and why, `failed` the
  objects each child could not embed.
- `current_etag(s3, url) -> str | None`: the object's ETag now, None once it is gone (one HEAD).
- `reconcile(s3, stores, tombstones, urls) -> Reconciled`: after S3 changed these objects in a way
  no shard announces (removed, an older version uncovered, the new version rejected or failed),
  tombstones them and removes every row of another version than S3's current one.
- `VectorStore.delete(urls) -> int`: rows removed; tombstones keep late shards from bringing them back.
- `VectorStore.nearest(vector, top, *, exclude=()) -> list[Match]`, `vector_of(url)`, `count()`,
  `dimensions()`, `index_state() -> IndexState`, `prewarm()` (reads the whole index into cache).
- `maintain(store, policy=IndexPolicy(), lease=None, text_probes=None) -> Maintenance(action, state,
  seconds, deferred, conflict, busy, measured)`: what was done, and a build, retrain or measurement
  left undone because the table is past `policy.max_train_rows` or another holder of the `S3Lease`
  is training it; after a training or growth it measures recall on the store's own vectors (and on
  `text_probes()`, text vectors of the store's model) and records the cheapest search settings that
  reach `policy.recall.target` (`IndexState.tuning`: a `Tuning`), which `nearest` then uses;
  `plan(state, policy) -> Action` says what is due without doing it.
- `submit_training(s3, batch, jobs, bucket, prefix, model_id, due) -> job id | None`: the AWS Batch
  job (`python -m clip_indexer.train`) that does a training past the indexer's bound; None when one
  is already on its way (a marker object, one job per due training).
- `StoreError(code, message)` with `Code.DIMENSION_MISMATCH`, `Code.BAD_SHARD`, `Code.SHARD_UNAVAILABLE`.
"""

from clip_store.database import Database
from clip_store.errors import Code, StoreError
from clip_store.lease import S3Lease
from clip_store.location import StorageSettings, store_uri, stored_models, tombstones_uri
from clip_store.maintain import Action, IndexPolicy, Maintenance, maintain, plan
from clip_store.recall import RecallPolicy, Tuning
from clip_store.reconcile import Reconciled, reconcile
from clip_store.shards import ShardsIngested, current_etag, ingest_shards, read_shard, s3_still_current
from clip_store.store import IndexState, Ingested, Match, SearchSettings, VectorStore
from clip_store.tombstones import Tombstones
from clip_store.trainer import TrainingJobs, submit_training

__all__ = [
    "Action",
    "Code",
    "Database",
    "IndexPolicy",
    "IndexState",
    "Ingested",
    "Maintenance",
    "Match",
    "RecallPolicy",
    "Reconciled",
    "S3Lease",
    "SearchSettings",
    "ShardsIngested",
    "StorageSettings",
    "StoreError",
    "Tombstones",
    "TrainingJobs",
    "Tuning",
    "VectorStore",
    "current_etag",
    "ingest_shards",
    "maintain",
    "plan",
    "read_shard",
    "reconcile",
    "s3_still_current",
    "store_uri",
    "submit_training",
    "stored_models",
    "tombstones_uri",
]
