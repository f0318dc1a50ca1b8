"""`clip-pipeline local`, the README's main command, end to end on real photos and bad inputs, offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from PIL import Image
from typer.testing import CliRunner

from clip_pipeline.app import app
from clip_shared import keys
from tests.support import (
    SITECUSTOMIZE,
    TINY_MODEL,
    all_formats,
    cosine,
    encode,
    photo,
    poisoned_png,
    reference_embedding,
    stored_events,
    stored_vectors,
)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, dict[str, Image.Image]]:
    folder = tmp_path / "uploads"
    (folder / "every format").mkdir(parents=True)
    expected = {}
    for name, (data, _, seen) in all_formats(photo("astronaut.png")).items():
        (folder / "every format" / name).write_bytes(data)
        expected[f"every format/{name}"] = seen
    good = encode(photo(), "JPEG")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.jpg").write_text("a text file with an image's name")
    (folder / "empty.png").write_bytes(b"")
    # 10,000 x 10,000 pixels in a few hundred kilobytes: over the stack's MaxImagePixels.
    (folder / "bomb.png").write_bytes(encode(Image.new("1", (10_000, 10_000)), "PNG", optimize=True))
    # Kills the process that decodes it (see tests.support.SITECUSTOMIZE).
    (folder / "poison.png").write_bytes(poisoned_png())
    # Names a file system allows and the emulator or S3 does not: reported, and the rest goes on.
    (folder / "two\nlines.png").write_bytes(encode(photo(), "PNG"))
    (folder / os.fsdecode(b"latin-1 caf\xe9.png")).write_bytes(encode(photo(), "PNG"))
    return folder, expected


def test_local_runs_the_whole_pipeline_and_accounts_for_every_file(
    inputs: tuple[Path, dict[str, Image.Image]], tiny_config: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    folder, expected = inputs
    labels = ["astronaut", "cat", "rocket", "cup of coffee"]
    command = [
        sys.executable, "-m", "clip_pipeline", "local", str(folder),
        "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--model-config", str(tiny_config),
        "--shard-size", "6", "--batching-window", "1", "--labels", ",".join(labels), "--keywords-top-k", "2", "--keep", "--json",
    ]  # fmt: skip
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(tmp_path), environment.get("PYTHONPATH", "")])
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        summary = json.loads(line)

        assert summary["uploaded"] == len(expected) + 5
        assert summary["not_uploaded"] == {
            "two\nlines.png": "the emulator cannot store a key with a line break (S3 can)",
            os.fsdecode(b"latin-1 caf\xe9.png"): "its name is not UTF-8, which an S3 key must be",
        }
        assert summary["embedded"] == len(expected)
        # The 17 objects that pass the dispatcher make one array job of ceil(17 / 6) = 3 children; the
        # poison kills only the helper process that decodes it (clip_worker/sandbox.py), not its child.
        assert (summary["batch_jobs"], summary["job_runs"], summary["failed_job_runs"]) == (1, 3, 0)
        assert summary["rejected"]["count"] == 2
        assert {url.rsplit("/", 1)[-1]: r["code"] for url, r in summary["rejected"]["examples"].items()} == {
            "notes.jpg": "unsupported-type",
            "empty.png": "unsupported-type",
        }
        assert summary["failed"]["codes"] == {"corrupt-image": 1, "too-many-pixels": 1, "crashes-worker": 1}
        assert {url.rsplit("/", 1)[-1]: r["code"] for url, r in summary["failed"]["examples"].items()} == {
            "truncated.jpg": "corrupt-image",
            "bomb.png": "too-many-pixels",
            "poison.png": "crashes-worker",
        }
        assert all(url in r["message"] for url, r in summary["failed"]["examples"].items())
        assert summary["images_per_s"] > 0

        # The emulator is still up (--keep): every image has a vector matching open_clip, and an event.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        s3 = boto3.client("s3", endpoint_url=summary["endpoint_url"], region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local")  # fmt: skip
        output = summary["parquet"].removeprefix("s3://").split("/", 1)[0]
        model_id = keys.model_id(TINY_MODEL, str(tiny_checkpoint))
        vectors, events = stored_vectors(s3, model_id, bucket=output), stored_events(s3, model_id, bucket=output)
        for key, seen in expected.items():
            assert cosine(vectors[key], reference_embedding(seen, TINY_MODEL, str(tiny_checkpoint))) >= 0.999, key
            assert events[key]["type"] == "document-created"
            # --labels reaches the jobs: two of the given labels, best first.
            keywords = events[key]["data"]["metadata"]["keywords"]
            assert len(keywords) == 2 and set(keywords) <= set(labels)

        status = CliRunner().invoke(
            app, ["status", "--stack-name", summary["stack_name"], "--endpoint-url", summary["endpoint_url"], "--region", "us-east-1", "--json"],
            env={"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"},
        )  # fmt: skip
        assert status.exit_code == 0, status.output
        report = json.loads(status.stdout)
        assert (report["embedded"], report["rejected"]["count"], report["failed"]["count"], report["dead_letter_messages"]) == (
            len(expected),
            2,
            3,
            0,
        )
        assert report["jobs"]["SUCCEEDED"] == 1
        table = CliRunner().invoke(
            app, ["status", "--stack-name", summary["stack_name"], "--endpoint-url", summary["endpoint_url"], "--region", "us-east-1"],
            env={"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "COLUMNS": "200"},
        ).stdout  # fmt: skip
        # Each reason sits under its own outcome's row.
        rejected, failed = table.index("│ rejected"), table.index("│ failed")
        assert rejected < table.index("notes.jpg") < failed < table.index("truncated.jpg")
        assert report["upload_queue"] == {"waiting": 0, "in_flight": 0, "oldest_s": None}
        # The Lambda lane's queues, drained (EmbedLane batch: the dispatcher reads them).
        assert report["lane_queue"] == report["lane_fallback_queue"] == {"waiting": 0, "in_flight": 0, "oldest_s": None}

        # --keep keeps the pipeline, not only the data: a later upload is embedded too.
        input_bucket = keys.parse_s3_url(next(iter(summary["rejected"]["examples"])))[0]
        s3.put_object(Bucket=input_bucket, Key="later/astronaut.png", Body=encode(photo("astronaut.png"), "PNG"))
        deadline = time.monotonic() + 120
        while "later/astronaut.png" not in stored_vectors(s3, model_id, bucket=output):
            assert time.monotonic() < deadline, "the kept pipeline did not embed a later upload"
            time.sleep(1)
    finally:
        # Ctrl-C ends it even where the test runner was started with SIGINT ignored, which its children inherit.
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    # --json: progress came as JSON lines on stderr, ending at the totals.
    assert process.stderr is not None
    stderr = process.stderr.read().splitlines()
    progress = [json.loads(line) for line in stderr if line.startswith('{"progress"')]
    last = {line["progress"]: line for line in progress}
    assert last["uploaded"]["completed"] == last["uploaded"]["total"] == len(expected) + 7
    assert last["dispatched"]["completed"] == len(expected) + 5
    # Every upload got an outcome, the two rejected included: the bar ends at its total.
    assert last["processed"]["completed"] == last["processed"]["total"] == len(expected) + 5
    # What the functions, the workers and the libraries print went to the log, not between the bars.
    assert not [line for line in stderr if "moto" in line.lower() or line.startswith(('{"level"', '{"_aws"'))]
    log = Path(summary["log"]).read_text()
    assert "No Moto CloudFormation support" in log and '"message":"Submitted job"' in log
    # Each function's metrics carry its own service name, and its context the template's memory.
    metrics = [json.loads(line) for line in log.splitlines() if '"ObjectsRejected"' in line]
    assert metrics and {metric["service"] for metric in metrics} == {"dispatcher"}
    logged = [json.loads(line) for line in log.splitlines() if '"function_memory_size"' in line]
    assert {line["service"]: line["function_memory_size"] for line in logged} == {"dispatcher": 256, "clip-indexer": 3008}


def test_local_says_in_one_line_what_to_do_when_weights_cannot_be_had(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    result = subprocess.run(
        [sys.executable, "-m", "clip_pipeline", "local", "--pretrained", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "pass --pretrained /path/to/checkpoint.pt, or --pretrained none" in result.stderr


def test_local_lambda_lane_embeds_each_request_as_a_job_child_would(
    tmp_path: Path, tiny_config: Path, tiny_checkpoint: Path
) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        (folder / f"IMG #{name}.jpg").write_bytes(encode(photo(name), "JPEG"))
    (folder / "poison.png").write_bytes(poisoned_png())
    (folder / "notes.jpg").write_text("not an image")
    # A codec's crash (SIGSEGV): it fails alone in the lane. (A SIGKILL, the kernel's out-of-memory
    # killer, would leave it to the Batch job, with more memory.)
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("SIGKILL", "SIGSEGV"))
    command = [
        sys.executable, "-m", "clip_pipeline", "local", str(folder),
        "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--model-config", str(tiny_config),
        "--batching-window", "1", "--lane", "lambda", "--lane-max-images", "2", "--json",
    ]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(tmp_path), environment.get("PYTHONPATH", "")])
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[0])
    # Five accepted objects in requests of at most two: three invocations of the embedding function, no job.
    assert (summary["lane_requests"], summary["lane_images"], summary["lane_handed_to_batch"]) == (3, 5, 0)
    assert (summary["batch_jobs"], summary["embedded"]) == (0, 4)
    assert {url.rsplit("/", 1)[-1]: r["code"] for url, r in summary["failed"]["examples"].items()} == {
        "poison.png": "crashes-worker"
    }
    assert {url.rsplit("/", 1)[-1]: r["code"] for url, r in summary["rejected"]["examples"].items()} == {
        "notes.jpg": "unsupported-type"
    }
    log = Path(summary["log"]).read_text()
    logged = [json.loads(line) for line in log.splitlines() if '"function_memory_size"' in line]
    assert {line["service"]: line["function_memory_size"] for line in logged}["clip-embed"] == 3008
