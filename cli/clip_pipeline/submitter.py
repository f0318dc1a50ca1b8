"""Many objects -> AWS Batch array jobs, for the CLI's bulk commands (backfill, retry).

Entries are gathered until a job has CHILDREN_PER_JOB array children's worth, then submitted with
the dispatcher's own code: the GPUs start on the first jobs while the listing goes on, and the CLI
holds one job's entries at a time, not a ten-million-object backfill's. A submission that fails
gives back what was held for its objects (retry markers) so a later run can take them, and the
error ends the command.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clip_dispatch.submission import SubmittedJob, new_manifest_id, submit
from clip_pipeline.stack import Clients, Stack, function_environment
from clip_shared import defaults, keys
from clip_shared.manifest import ManifestEntry

# Well under Batch's SubmitJob limit of 50 per second per account, which the dispatcher shares.
SUBMIT_INTERVAL_S = 0.1
#: 100 children of 1,000 images (the default ShardSize): a job per 100,000 objects, a hundred jobs for
#: ten million, far below Batch's 10,000 children a job and SubmitJob's rate.
CHILDREN_PER_JOB = 100


@dataclass(frozen=True)
class Target:
    """Where the CLI's jobs go, under the limits the deployed dispatcher applies to uploads."""

    s3: Any
    batch_client: Any
    output_bucket: str
    output_prefix: str
    job_queue: str
    job_definition: str
    shard_size: int
    max_object_bytes: int
    model_id: str

    @classmethod
    def of(cls, clients: Clients, stack: Stack) -> Target:
        settings = function_environment(clients, stack, "DispatcherFunctionName")
        return cls(
            s3=clients.client("s3"),
            batch_client=clients.client("batch"),
            output_bucket=stack.output("OutputBucketName"),
            output_prefix=stack.output_prefix,
            job_queue=stack.output("JobQueueArn"),
            job_definition=stack.output("JobDefinitionArn"),
            shard_size=int(settings.get("SHARD_SIZE", defaults.SHARD_SIZE)),
            max_object_bytes=int(settings.get("MAX_OBJECT_BYTES", defaults.MAX_OBJECT_BYTES)),
            model_id=keys.model_id(stack.model, stack.pretrained),
        )


@dataclass
class JobSubmitter:
    target: Target
    #: Undoes what was held for entries whose job could not be submitted.
    release: Callable[[list[ManifestEntry]], None] = lambda entries: None
    on_submitted: Callable[[SubmittedJob, int], None] = lambda job, entries: None
    manifest_id: str = field(default_factory=lambda: new_manifest_id(datetime.now(UTC)))
    entries: list[ManifestEntry] = field(default_factory=list)
    jobs: int = 0
    submitted: int = 0

    def add(self, entries: Iterable[ManifestEntry]) -> None:
        self.entries += entries
        if len(self.entries) >= self.target.shard_size * CHILDREN_PER_JOB:
            self.flush()

    def flush(self) -> None:
        if not self.entries:
            return
        try:
            target = self.target
            job = submit(
                target.s3,
                target.batch_client,
                target.output_bucket,
                target.output_prefix,
                self.manifest_id,
                self.entries,
                target.shard_size,
                target.job_queue,
                target.job_definition,
            )
        except Exception:
            self.release(self.entries)
            raise
        self.on_submitted(job, len(self.entries))
        self.jobs += 1
        self.submitted += len(self.entries)
        self.entries = []
        self.manifest_id = new_manifest_id(datetime.now(UTC))
        time.sleep(SUBMIT_INTERVAL_S)
