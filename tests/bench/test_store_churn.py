from __future__ import annotations

import os

from bench import store_churn


def test_store_churn_compares_churned_stores_with_a_fresh_one_and_restores_the_environment() -> None:
    before = dict(os.environ)

    results = store_churn.main(["--batches", "5", "--max-fragments", "2"])

    assert os.environ == before
    labels = ["fresh", "churned, compacted at 2 fragments", "churned, no compaction"]
    assert list(results) == ["batches", *labels]
    assert all(results[label]["query_requests"] > 0 and results[label]["warm_ingest_requests"] > 0 for label in labels)
    # Compaction keeps a fresh reader's query to fewer requests than five uncompacted commits cost it.
    assert results["churned, compacted at 2 fragments"]["query_requests"] < results["churned, no compaction"]["query_requests"]
