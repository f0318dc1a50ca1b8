"""Which lane embeds a dispatcher batch: a GPU job on AWS Batch, or the embedding function on Lambda.

A Batch job that finds the GPUs at zero pays an instance's boot, an image pull, the model load and
the idle minutes before scale-in, whatever the number of images; Lambda bills by the millisecond
with no idle, at a higher price per image (docs/scale.md, "Which lane"). So a trickle goes to
Lambda and a flood to the GPUs:

- `batch`: every batch is a Batch job (the default, and what `backfill` always does).
- `lambda`: every batch goes to the embedding function, in manifests of at most the lane's size.
- `auto`: a batch whose accepted objects fit the lane's size goes to Lambda, a bigger one to Batch,
  and so does every batch while the lane's queue holds more requests than its functions can take
  at once (a flood of small batches, or a slow model): the lane's backlog stays bounded.

Either way the same manifest files are written under the same keys, and the worker's code writes
the same outputs, so nothing downstream can tell the lanes apart. A lane request that the function
could not finish (it failed, timed out, or left objects to a retry) reaches the lane's fallback
queue, and the dispatcher submits its manifest to Batch, whose attempts resume what the function
finished (`EARLIER_ATTEMPTS`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

#: Images one invocation of the embedding function takes unless LAMBDA_LANE_MAX_IMAGES says
#: otherwise: an idle stack's first vector within 30 s for ViT-B-32 (docs/scale.md, "Which lane").
LAMBDA_LANE_MAX_IMAGES = 100
#: The attempts a lane request has had when its manifest reaches Batch: the function's one.
LANE_ATTEMPTS = 1


class EmbedLane(StrEnum):
    BATCH = "batch"
    LAMBDA = "lambda"
    AUTO = "auto"


class LaneRequest(BaseModel):
    """One invocation's work: a manifest of one shard, as a job child would read it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")

    manifest_uri: str = Field(min_length=6, pattern=r"^s3://")
    manifest_id: str = Field(min_length=1)
    images: int = Field(ge=1)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def lane_for(lane: EmbedLane, accepted: int, max_images: int, backlog: Callable[[], int], concurrency: int) -> EmbedLane:
    """The lane (batch or lambda) that embeds a batch of `accepted` objects; `backlog` counts the
    lane requests waiting for a function (asked only in `auto`, of a batch that fits)."""
    if lane is not EmbedLane.AUTO:
        return lane
    if accepted > max_images or backlog() >= concurrency:
        return EmbedLane.BATCH
    return EmbedLane.LAMBDA
