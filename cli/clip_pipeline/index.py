"""`clip-pipeline index`: each model's vector index kept up, by an AWS Batch job or here.

The indexer function keeps each model's index up after every ingest, but trains it only up to its
IndexMaxTrainRows (a Lambda has 15 minutes); past that it submits the training as a Batch job
(clip_store.trainer). This command does the same for whatever is due: by default it submits that
job (one per due training: a job already on its way is not submitted again), and with `--here` it
runs the same `maintain` on this machine with no limit, reading the whole table from S3 (a CPU
instance for tens of millions of rows: docs/scale.md). The job runs on the stack's CPU queue
(IndexJobQueue), not the GPU workers' queue. When nothing is due it changes nothing.
Either way it shows the search settings the store's readers use and the recall measured with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clip_pipeline.stack import Clients, Stack

if TYPE_CHECKING:  # clip_store loads lancedb (2 s), which the CLI's other commands never need
    from clip_store import IndexState


def maintain_stores(
    clients: Clients, stack: Stack, dry_run: bool, here: bool, on_start: Callable[[str, str], None]
) -> list[dict[str, Any]]:
    """For each model with a store: what was due, what was done (or the job submitted), and the index afterwards."""
    # Here, not at the top: as IndexState above.
    from clip_indexer.train import text_probes
    from clip_shared import keys
    from clip_store import (
        Action,
        Database,
        IndexPolicy,
        S3Lease,
        Tombstones,
        TrainingJobs,
        VectorStore,
        maintain,
        plan,
        store_uri,
        stored_models,
        submit_training,
        tombstones_uri,
    )
    from clip_store.trainer import JOB_TTL

    bucket, prefix, s3 = stack.output("OutputBucketName"), stack.output_prefix, clients.client("s3")
    # The tombstones the indexer keeps (its forgetting and compaction are upkeep too), and the lease
    # it trains under, so that this command and an indexer container never train the same index at once.
    tombstones = Tombstones(Database(tombstones_uri(bucket, prefix), settings=clients.storage()))
    results = []
    for model_id in stored_models(s3, bucket, prefix):
        store = VectorStore(store_uri(bucket, prefix, model_id), settings=clients.storage(), tombstones=tombstones)
        state = store.index_state()
        due = plan(state, IndexPolicy())
        on_start(model_id, str(due))
        done, job = None, ""
        if here and not dry_run:
            # Held as long as a training here may take, as the Batch job holds it.
            lease = S3Lease(s3, keys.s3_url(bucket, keys.training_lease_key(prefix, model_id)), ttl=JOB_TTL)
            done = maintain(store, lease=lease, text_probes=text_probes(model_id))
            state = done.state
        elif not dry_run and due is not Action.NONE:
            # Read here: a stack deployed before the index job or its CPU queue existed still trains --here.
            jobs = TrainingJobs(stack.output("IndexJobQueueArn"), stack.output("IndexJobDefinitionArn"))
            submitted = submit_training(s3, clients.client("batch"), jobs, bucket, prefix, model_id, str(due))
            job = submitted or "already submitted (one job per due training)"
        results.append(
            {
                "model_id": model_id,
                "due": str(due),
                "done": str(done.action) if done else "none",
                "job": job,
                "another_process_trains": done.busy if done else False,
                "seconds": round(done.seconds, 1) if done else 0.0,
                **described(state),
            }
        )
    return results


def described(state: IndexState) -> dict[str, Any]:
    """A store's index as `index` and `status` show it: its size, and the search settings readers use with
    the recall measured with them."""
    from clip_store.recall import UNMEASURED

    tuning = state.tuning
    if tuning is not None:
        search = tuning.summary()
    elif state.index_type is None:
        search = "exact (no index yet)"
    else:
        search = f"not measured yet: nprobes {UNMEASURED[0]}, refine {UNMEASURED[1]} until the next upkeep measures it"
    return {
        "rows": state.rows,
        "index": state.index_type or "none (exact search)",
        "trained_rows": state.trained_rows,
        "unindexed_rows": state.unindexed_rows,
        "search": search,
        "recall": tuning.recall if tuning else {},
        "recall_target_reached": tuning.reached if tuning else None,
    }


def store_indexes(clients: Clients, stack: Stack) -> dict[str, dict[str, Any]]:
    """Each stored model's index, described (`status`): table metadata only."""
    from clip_store import VectorStore, store_uri, stored_models

    bucket, prefix = stack.output("OutputBucketName"), stack.output_prefix
    return {
        model_id: described(VectorStore(store_uri(bucket, prefix, model_id), settings=clients.storage()).index_state())
        for model_id in stored_models(clients.client("s3"), bucket, prefix)
    }
