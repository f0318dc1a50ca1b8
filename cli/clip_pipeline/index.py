"""`clip-pipeline index`: the vector indexes' maintenance, run here, where it has no time limit.

The indexer function keeps each model's index up after every ingest, but trains it only up to its
IndexMaxTrainRows (a Lambda has 15 minutes); a build or retrain of a bigger table is left for this
command, run from any machine with the stack's credentials (a CPU instance for tens of millions of
rows: docs/search.md). It does what is due, the same `maintain` the indexer calls, with no limit,
so running it when nothing is due reads only table metadata and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clip_pipeline.stack import Clients, Stack


def maintain_stores(clients: Clients, stack: Stack, dry_run: bool, on_start: Callable[[str, str], None]) -> list[dict[str, Any]]:
    """For each model with a store: what was due, what was done, and the index afterwards."""
    # Here, not at the top: clip_store loads lancedb (2 s), which the CLI's other commands never need.
    from clip_shared import keys
    from clip_store import (
        Database,
        IndexPolicy,
        S3Lease,
        Tombstones,
        VectorStore,
        maintain,
        plan,
        store_uri,
        stored_models,
        tombstones_uri,
    )

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
        lease = S3Lease(s3, keys.s3_url(bucket, keys.training_lease_key(prefix, model_id)))
        done = None if dry_run else maintain(store, lease=lease)
        state = done.state if done else state
        results.append(
            {
                "model_id": model_id,
                "due": str(due),
                "done": str(done.action) if done else "none",
                "another_process_trains": done.busy if done else False,
                "seconds": round(done.seconds, 1) if done else 0.0,
                "rows": state.rows,
                "index": state.index_type or "none (exact search)",
                "trained_rows": state.trained_rows,
                "unindexed_rows": state.unindexed_rows,
            }
        )
    return results
