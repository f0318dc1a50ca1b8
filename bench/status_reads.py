"""What `clip-pipeline status` (report.tally) and `retry` (its failure scan) read as the children grow.

Writes job children's outputs with the worker's own writer on an in-process emulator (the tiny test
model, vectors made up: nothing is decoded), then counts the S3 requests and the bytes each reader
downloads, and the peak memory Python allocated while it ran, against the reference of reading every
events batch whole (what `status` did before the batches carried their counts).

    python -m bench.status_reads --children 20 --per-child 1000 --failed-every 500
"""

from __future__ import annotations

import argparse
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from clip_pipeline import report, retry
from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_shared.manifest import ManifestEntry
from clip_worker.model import load
from clip_worker.reader import ObjectVersion
from clip_worker.writer import OutputWriter
from tests.support import TINY_MODEL, register_tiny_model, save_tiny_checkpoint

BUCKET = "bench-outputs"


def write_children(s3: Any, children: int, per_child: int, failed_every: int) -> str:
    folder = Path(tempfile.mkdtemp())
    config = register_tiny_model(folder)
    model = load(TINY_MODEL, str(save_tiny_checkpoint(folder / "tiny.pt")), "cpu", model_config_path=str(config))
    vector = np.full(model.dimensions, model.dimensions**-0.5, np.float32)
    for child in range(children):
        writer = OutputWriter(s3, BUCKET, "", model, "job-1", "m-bench", child)
        entries = []
        for i in range(per_child):
            entry = ManifestEntry(
                bucket="photos",
                key=f"uploads/{child:05d}/img-{i:06d}.jpg",
                size=100_000,
                etag=f"{child}-{i}",
                mime_type="image/jpeg",
            )
            entries.append(entry)
            if failed_every and (child * per_child + i) % failed_every == failed_every - 1:
                writer.failed(entry, DocumentError(ErrorCode.DOWNLOAD_FAILED, f"{entry.url}: S3 timed out"))
            else:
                writer.created(entry, ObjectVersion(entry.etag, datetime.now(UTC)), vector)
        writer.checkpoint(tuple(entries))
    return model.id


def measured(s3: Any, read: Callable[[], Any]) -> tuple[Counter[str], int, int]:
    """The requests by operation, the bytes of the bodies read, and the peak traced memory."""
    calls: Counter[str] = Counter()
    downloaded = [0]

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    def body(http_response: Any, model: Any, **_: Any) -> None:
        if model.name == "GetObject":
            downloaded[0] += int(http_response.headers.get("content-length", 0))

    s3.meta.events.register("before-call.s3", count)
    s3.meta.events.register("after-call.s3", body)
    tracemalloc.start()
    read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    s3.meta.events.unregister("before-call.s3", count)
    s3.meta.events.unregister("after-call.s3", body)
    return calls, downloaded[0], peak


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    import boto3
    from moto import mock_aws

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=20)
    parser.add_argument("--per-child", type=int, default=1000)
    parser.add_argument("--failed-every", type=int, default=500, help="one object in this many fails (0: none)")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        model_id = write_children(s3, args.children, args.per_child, args.failed_every)
        batches = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=keys.events_prefix("", model_id))["Contents"]]
        readers: dict[str, Callable[[], Any]] = {
            "every batch read (reference)": lambda: [s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in batches],
            "status (report.tally)": lambda: report.tally(s3, BUCKET, "", model_id),
            "retry's failures": lambda: retry.latest_failures(s3, BUCKET, "", model_id),
        }
        images = args.children * args.per_child
        print(f"{args.children} children x {args.per_child} images = {images:,}, one in {args.failed_every} failed")
        reference = None
        for name, read in readers.items():
            calls, downloaded, peak = measured(s3, read)
            reference = reference or (downloaded, peak)
            requests = sum(calls.values())
            results[name] = {"requests": dict(calls), "bytes": downloaded, "peak_bytes": peak}
            print(
                f"{name:30} {requests:6} requests ({requests / args.children:.2f} per child: {dict(sorted(calls.items()))}), "
                f"{downloaded / 1e6:8.2f} MB read ({downloaded / reference[0]:.3f} of the reference), "
                f"peak {peak / 1e6:7.2f} MB ({peak / reference[1]:.3f})"
            )
    return results


if __name__ == "__main__":
    main()
