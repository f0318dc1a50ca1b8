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
    from clip_store import IndexPolicy, VectorStore, maintain, plan, store_uri, stored_models

    bucket, prefix = stack.output("OutputBucketName"), stack.output_prefix
    results = []
    for model_id in stored_models(clients.client("s3"), bucket, prefix):
        store = VectorStore(store_uri(bucket, prefix, model_id), settings=clients.storage())
        state = store.index_state()
        due = plan(state, IndexPolicy())
        on_start(model_id, str(due))
        done = None if dry_run else maintain(store)
        state = done.state if done else state
        results.append(
            {
                "model_id": model_id,
                "due": str(due),
                "done": str(done.action) if done else "none",
                "seconds": round(done.seconds, 1) if done else 0.0,
                "rows": state.rows,
                "index": state.index_type or "none (exact search)",
                "trained_rows": state.trained_rows,
                "unindexed_rows": state.unindexed_rows,
            }
        )
    return results
