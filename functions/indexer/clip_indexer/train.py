"""The AWS Batch job that trains a store's index past what the indexer trains within its time.

    python -m clip_indexer.train MODEL_ID

Run in the worker image (it ships clip_store, and bakes the label set's prompt vectors that probe
text -> image recall) by template.yaml's IndexJobDefinition, which the indexer and `clip-pipeline
index` submit (clip_store.trainer). It does what `maintain` finds due, with no limit on the rows it
trains on, under the same training lease as the indexer, prints the outcome as one JSON line, and
releases the job marker that kept a second job from being submitted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict

import boto3
import numpy as np

from clip_shared import keys
from clip_shared.aws import CLIENT_CONFIG
from clip_store import Database, S3Lease, Tombstones, VectorStore, maintain, store_uri, tombstones_uri
from clip_store.maintain import TextProbes
from clip_store.trainer import JOB_TTL, job_marker


def text_probes(model_id: str) -> TextProbes:
    """The label set's prompt vectors the image baked for this model (none: images alone are probed)."""

    def read() -> np.ndarray | None:
        # Imported when called: the worker's labels module is numpy only, but not needed unless measuring.
        from clip_worker.labels import baked_vectors

        return baked_vectors(model_id, os.environ.get("CLIP_CACHE_DIR"))

    return read


def main(argv: list[str]) -> int:
    [model_id] = argv
    # clip_store's progress (each search setting measured) into the job's log stream: hours at 100M rows.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bucket, prefix = os.environ["OUTPUT_BUCKET"], os.environ.get("OUTPUT_PREFIX", "")
    s3 = boto3.client("s3", config=CLIENT_CONFIG)
    store = VectorStore(store_uri(bucket, prefix, model_id), tombstones=Tombstones(Database(tombstones_uri(bucket, prefix))))
    # Held as long as this job may run, so that no other trainer takes it over meanwhile.
    lease = S3Lease(s3, keys.s3_url(bucket, keys.training_lease_key(prefix, model_id)), ttl=JOB_TTL)
    try:
        done = maintain(store, lease=lease, text_probes=text_probes(model_id))
    finally:
        job_marker(s3, bucket, prefix, model_id).release()
    print(json.dumps({"model_id": model_id, **asdict(done)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
