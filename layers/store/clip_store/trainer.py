"""Trainings past what a Lambda can do, handed to an AWS Batch job on the stack's compute.

The indexer trains an index only up to IndexMaxTrainRows (a Lambda has 15 minutes). Past that,
`maintain` defers the build, retrain or recall measurement, and the indexer (or `clip-pipeline
index`) calls `submit_training`: the job (`python -m clip_indexer.train MODEL_ID`, in the worker
image, template.yaml's IndexJobDefinition) runs the same `maintain` with no limit.

One job per due training: a marker object (keys.training_job_key) is created only if absent,
S3's `If-None-Match` as for the training lease (lease.S3Lease), and deleted by the job when it
ends. SQS redeliveries, the second indexer container and the CLI all find it and submit nothing.
A job that never ran or died leaves it behind: past `JOB_TTL` the next deferral takes it over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from clip_shared import keys
from clip_store.lease import S3Lease

#: Longer than a job may wait to start (RunnableTimeoutSeconds, at most 24 h) plus run (12 h: template.yaml's
#: IndexJobDefinition): a marker older than that belongs to a job that will never release it.
JOB_TTL = timedelta(hours=40)


@dataclass(frozen=True)
class TrainingJobs:
    """Where the stack runs trainings: its job queue and the index job's definition."""

    queue: str
    definition: str


def job_marker(s3: Any, bucket: str, prefix: str, model_id: str) -> S3Lease:
    return S3Lease(s3, keys.s3_url(bucket, keys.training_job_key(prefix, model_id)), ttl=JOB_TTL)


def submit_training(s3: Any, batch: Any, jobs: TrainingJobs, bucket: str, prefix: str, model_id: str, due: str) -> str | None:
    """Submits the job that does what is due to `model_id`'s index; its id, or None if one is already on its way."""
    marker = job_marker(s3, bucket, prefix, model_id)
    if not marker.take(due):
        return None
    try:
        submitted = batch.submit_job(
            jobName=re.sub(r"[^A-Za-z0-9_-]", "-", f"clip-index-{model_id}")[:128],
            jobQueue=jobs.queue,
            jobDefinition=jobs.definition,
            containerOverrides={"command": ["python", "-m", "clip_indexer.train", model_id]},
        )
    except Exception:
        marker.release()  # nothing submitted: the next deferral tries again
        raise
    return str(submitted["jobId"])
