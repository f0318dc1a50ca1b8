"""The container command itself: `python -m clip_worker` in its own process, against a moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from clip_shared.manifest import Manifest, ManifestEntry
from clip_worker.config import WorkerConfig
from clip_worker.runner import EXIT_INTERRUPTED, run
from tests.conftest import INPUT_BUCKET, OUTPUT_BUCKET
from tests.support import TINY_MODEL, encode, photo

IMAGES = 40


def test_sigterm_flushes_finished_work_exits_143_and_a_retry_resumes(
    moto_endpoint: str, tiny_config: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    s3 = boto3.client("s3")
    for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
        s3.create_bucket(Bucket=bucket)
    entries = []
    for i in range(IMAGES):
        data = encode(photo().rotate(i), "PNG")
        s3.put_object(Bucket=INPUT_BUCKET, Key=f"img-{i:02d}.png", Body=data)
        etag = s3.head_object(Bucket=INPUT_BUCKET, Key=f"img-{i:02d}.png")["ETag"].strip('"')
        entries.append(ManifestEntry(bucket=INPUT_BUCKET, key=f"img-{i:02d}.png", size=len(data), etag=etag, mime_type="image/png"))
    s3.put_object(Bucket=OUTPUT_BUCKET, Key="manifests/m.json", Body=Manifest(manifest_id="m", shard_size=IMAGES, entries=tuple(entries)).to_json())

    env = {
        **os.environ,
        "MANIFEST_URI": f"s3://{OUTPUT_BUCKET}/manifests/m.json",
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "OUTPUT_PREFIX": "",
        "CLIP_MODEL": TINY_MODEL,
        "CLIP_MODEL_CONFIG": str(tiny_config),
        "CLIP_PRETRAINED": str(tiny_checkpoint),
        "DEVICE": "cpu",
        "BATCH_SIZE": "1",
        "IO_THREADS": "1",
        "PROGRESS_INTERVAL_SECONDS": "1",
    }
    worker = subprocess.Popen([sys.executable, "-m", "clip_worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="events/").get("KeyCount"):
        assert worker.poll() is None and time.monotonic() < deadline, "the worker never wrote an event"
        time.sleep(0.02)
    worker.terminate()
    output, _ = worker.communicate(timeout=60)

    assert worker.returncode == EXIT_INTERRUPTED, output
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    final = next(log for log in logs if log["message"] == "job interrupted")
    assert 0 < final["embedded"] < IMAGES
    # Everything counted as embedded was flushed: a vector and an event each, and the partial shard.
    events = s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="events/")["KeyCount"]
    vectors = s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="vectors/")["KeyCount"]
    assert events == vectors == final["embedded"]
    assert final["shard"].endswith("shard-00000.parquet")

    # Batch's retry runs the same command again; it picks up where the first attempt stopped.
    retry = run(WorkerConfig.from_env(env), s3=s3)
    assert retry.exit_code == 0
    assert (retry.progress.skipped, retry.progress.embedded) == (final["embedded"], IMAGES - final["embedded"])
