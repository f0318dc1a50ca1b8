"""The container command itself: `python -m clip_worker` in its own process, against a moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from clip_shared import keys
from clip_shared.manifest import ManifestEntry
from clip_worker.config import WorkerConfig
from clip_worker.runner import EXIT_INTERRUPTED, run
from tests.conftest import INPUT_BUCKET, OUTPUT_BUCKET
from tests.support import TINY_MODEL, encode, photo, put_manifest, stored_events, stored_vectors

IMAGES = 150


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
        entries.append(
            ManifestEntry(bucket=INPUT_BUCKET, key=f"img-{i:02d}.png", size=len(data), etag=etag, mime_type="image/png")
        )
    uri = put_manifest(s3, entries, shard_size=IMAGES, manifest_id="m")

    env = {
        **os.environ,
        "MANIFEST_URI": uri,
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
    worker = subprocess.Popen(
        [sys.executable, "-m", "clip_worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert worker.stdout is not None
    lines = []
    # Terminated once it has embedded something: its outputs exist only in memory until then.
    for line in worker.stdout:
        lines.append(line)
        if line.startswith("{") and json.loads(line).get("message") == "progress" and json.loads(line)["embedded"]:
            break
    worker.terminate()
    output = "".join(lines) + worker.communicate(timeout=60)[0]

    assert worker.returncode == EXIT_INTERRUPTED, output
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    final = next(log for log in logs if log["message"] == "job interrupted")
    assert 0 < final["embedded"] < IMAGES
    # Everything counted as embedded was flushed: an event each in the batch, and a row each in the partial shard.
    mid = keys.model_id(TINY_MODEL, str(tiny_checkpoint))
    assert len(stored_events(s3, mid)) == len(stored_vectors(s3, mid)) == final["embedded"]
    assert final["shard"].endswith("shard-00000.parquet")

    # Batch's retry runs the same command again; it picks up where the first attempt stopped.
    retry = run(WorkerConfig.from_env({**env, "AWS_BATCH_JOB_ATTEMPT": "2"}), s3=s3)
    assert retry.exit_code == 0
    assert (retry.progress.skipped, retry.progress.embedded) == (final["embedded"], IMAGES - final["embedded"])
    assert len(stored_vectors(s3, mid)) == IMAGES


def test_a_gpu_job_without_a_usable_gpu_fails_at_once_saying_why(
    moto_endpoint: str, tiny_config: Path, tiny_checkpoint: Path
) -> None:
    """The job definition sets DEVICE=cuda: a driver the image's CUDA cannot use must fail the job with
    the reason (exit 1, which the job definition does not retry), not embed on the CPU for hours."""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
        s3.create_bucket(Bucket=bucket)
    data = encode(photo(), "PNG")
    s3.put_object(Bucket=INPUT_BUCKET, Key="img.png", Body=data)
    etag = s3.head_object(Bucket=INPUT_BUCKET, Key="img.png")["ETag"].strip('"')
    entry = ManifestEntry(bucket=INPUT_BUCKET, key="img.png", size=len(data), etag=etag, mime_type="image/png")
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "MANIFEST_URI": put_manifest(s3, [entry], shard_size=1, manifest_id="no-gpu"),
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "CLIP_MODEL": TINY_MODEL,
        "CLIP_MODEL_CONFIG": str(tiny_config),
        "CLIP_PRETRAINED": str(tiny_checkpoint),
        "DEVICE": "cuda",
        # No GPU is visible, whatever this machine has: as on an instance whose driver CUDA cannot use.
        "CUDA_VISIBLE_DEVICES": "",
    }

    worker = subprocess.run([sys.executable, "-m", "clip_worker"], env=env, capture_output=True, text=True, timeout=300)

    assert worker.returncode == 1, worker.stdout + worker.stderr
    assert "DEVICE=cuda but CUDA is unusable here" in worker.stdout + worker.stderr
    # Nothing embedded (moto keeps other tests' objects: this job's own shard is what must not exist).
    shards = keys.parquet_prefix("", keys.model_id(TINY_MODEL, str(tiny_checkpoint))) + "no-gpu/"
    assert s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=shards)["KeyCount"] == 0
