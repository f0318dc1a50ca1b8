from __future__ import annotations

from bench import status_reads
from clip_pipeline import report


def test_status_reads_a_head_per_child_and_a_few_batches_where_the_reference_reads_them_all() -> None:
    results = status_reads.main(["--children", "6", "--per-child", "40", "--failed-every", "20"])

    status, reference = results["status (report.tally)"], results["every batch read (reference)"]
    assert reference["requests"] == {"GetObject": 6}
    assert status["requests"]["HeadObject"] == 6 and status["requests"]["GetObject"] == report.EXAMPLE_BATCHES
    assert status["bytes"] < reference["bytes"]
    # Every child holds failures here: retry reads each batch once.
    assert results["retry's failures"]["requests"]["GetObject"] == 6
