"""Upload -> vector and upload -> searchable, per lane, on the emulated stack (`clip-pipeline local`'s).

Deploys template.yaml in the embedded emulator with EmbedLane batch, then lambda, and for each
uploads 1, 10 and 100 photos (2 MP JPEGs) at once and does AWS's part as `clip-pipeline local`
does (clip_pipeline.local.StandIn): the dispatcher's poller, then the Lambda lane's function in
this process, or the Batch job as a child process, then the indexer. It times, from the last
upload:

- dispatched: the batching window closed and the dispatcher handed the batch on;
- vector: the lane's invocation or the job's child wrote the shard;
- searchable: the indexer committed it to the vector store.

The emulated stack has no GPU instance to boot and no image to pull: a Batch job here is a
process that starts, imports, loads the model and embeds on this machine's CPUs, so its figures
are the least a job costs, not AWS's 3-5 minute scale-up from zero (docs/scale.md adds that). The
Lambda lane runs as the function does when warm; its first request in a process also loads the
model, which is the function's cold start less the container's own start.

    python -m bench.lane_latency                        # ViT-B-32 (seeded random weights), 1/10/100 uploads
    python -m bench.lane_latency --uploads 1 3           # a shorter run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from bench._harness import environment, jpeg_photo, save_random_checkpoint, write_json
from clip_pipeline import local
from clip_pipeline.stack import Clients, Stack
from clip_shared.lane import EmbedLane

#: A phone photo's size, scaled down to keep the run short: the decode is bounded by the model's input anyway.
PHOTO_SIZE = (1600, 1200)


def _ignore(*_: Any) -> None:
    """What a line of the worker's or a message of the stand-in's is worth here: nothing."""


@contextlib.contextmanager
def stack(
    lane: EmbedLane, model: str, pretrained: str, max_images: int, log: TextIO | None
) -> Iterator[tuple[Clients, Stack, local.StandIn]]:
    parameters = {
        "ClipModel": model,
        "ClipPretrained": pretrained,
        "MaximumBatchingWindowInSeconds": "1",
        "EmbedLane": str(lane),
        "LambdaLaneMaxImages": str(max_images),
    }
    with local.emulated_stack(parameters) as (clients, emulated):
        yield clients, emulated, local.StandIn(clients, emulated, {}, log)


def one_run(clients: Clients, emulated: Stack, stand_in: local.StandIn, uploads: int, photo: bytes, tag: str) -> dict[str, Any]:
    s3 = clients.client("s3")
    bucket = emulated.output("InputBucketName")
    for index in range(uploads):
        # Each a distinct object (its own bytes), as the uploads of an app would be.
        s3.put_object(Bucket=bucket, Key=f"{tag}/photo-{index:04d}.jpg", Body=photo + index.to_bytes(4, "big"))
    started = time.monotonic()
    times: dict[str, float] = {}

    def mark(name: str, happened: object) -> None:
        if happened:
            times[name] = round(time.monotonic() - started, 2)

    # StandIn.step's stages one by one, each timed as it ends.
    while True:
        dispatched = stand_in.dispatcher.poll()
        mark("dispatched", dispatched and "dispatched" not in times)
        lane = stand_in.embedder.poll() if stand_in.embedder else []
        mark("vector", lane)
        jobs = stand_in.batch.run_pending(_ignore)
        mark("vector", jobs)
        indexed = stand_in.indexer.poll()
        mark("searchable", indexed)
        if not (dispatched or lane or jobs or indexed) and stand_in.idle():
            break
    return {"uploads": uploads, **times}


def measure(lanes: Sequence[EmbedLane], counts: Sequence[int], model: str, pretrained: str, folder: Path) -> list[dict[str, Any]]:
    photo = jpeg_photo(PHOTO_SIZE)
    rows = []
    with local.captured_logs(folder / "log.txt") as log:
        for lane in lanes:
            with stack(lane, model, pretrained, max(counts), log) as (clients, emulated, stand_in):
                # The lambda lane's first request loads the model in this process (its cold start); the rest are warm.
                runs = (
                    [(counts[0], "cold")] + [(count, "warm") for count in counts]
                    if lane is EmbedLane.LAMBDA
                    else [(count, "job") for count in counts]
                )
                for count, state in runs:
                    rows.append(
                        {
                            "lane": str(lane),
                            "state": state,
                            **one_run(clients, emulated, stand_in, count, photo, f"{lane}-{state}-{count}"),
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, nargs="+", default=[1, 10, 100], help="uploads per run (default 1 10 100)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (seeded random weights)")
    parser.add_argument("--lanes", nargs="+", default=["batch", "lambda"], choices=["batch", "lambda"])
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_random_checkpoint(args.model, Path(folder) / "weights.pt")
        for lane in args.lanes:
            if len(args.lanes) > 1:
                # moto's accounts live as long as the process: each lane's stack gets a process of its own.
                out = Path(folder) / f"{lane}.json"
                command = [sys.executable, "-m", "bench.lane_latency", "--model", args.model, "--lanes", lane, "--json", str(out)]
                subprocess.run([*command, "--uploads", *map(str, args.uploads)], check=True, stdout=subprocess.DEVNULL)
                rows += json.loads(out.read_text())["rows"]
            else:
                rows += measure([EmbedLane(lane)], args.uploads, args.model, str(checkpoint), Path(folder))
    print(f"{'lane':<8} {'state':<6} {'uploads':>7} {'dispatched s':>12} {'vector s':>9} {'searchable s':>12}")
    for row in rows:
        print(
            f"{row['lane']:<8} {row['state']:<6} {row['uploads']:>7} {row.get('dispatched', '-'):>12} "
            f"{row.get('vector', '-'):>9} {row.get('searchable', '-'):>12}"
        )
    write_json(args.json, {"environment": environment(), "model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
