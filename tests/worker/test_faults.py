"""Nothing is lost on a bad day: S3 throttling, failing writes, and images that kill the worker.

S3's answers are replaced by the 503 SlowDown S3 sends under load, through botocore's own event
hooks on the client the worker uses.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.retries.standard import ExponentialBackoff

from clip_shared import keys
from clip_worker.__main__ import main
from clip_worker.config import WorkerConfig
from clip_worker.runner import EXIT_OK, EXIT_RETRY, run, s3_client
from tests.support import (
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    SITECUSTOMIZE,
    TINY_MODEL,
    encode,
    photo,
    poisoned_png,
    put_manifest,
    stored_events,
    tiny_worker_config,
    upload,
)
from tests.worker.test_runner import model_id, read_shard

SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


class SlowDown:
    """Answers 503 SlowDown to a random share of requests, or to every request `picks` chooses."""

    def __init__(
        self, share: float = 0.0, picks: Callable[[str, str], bool] = lambda operation, url: False, seed: int = 7
    ) -> None:
        self.share = share
        self.picks = picks
        self.random = random.Random(seed)
        self.requests = 0
        self.refused = 0

    def __call__(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        # botocore runs every before-send handler and takes the first answer, so moto's would still
        # carry out a refused write: a refused request's address is one moto does not serve, and a
        # retry of it (the same request object) gets its own address back.
        request.url = getattr(request, "refused_url", request.url)
        self.requests += 1
        operation = event_name.rsplit(".", 1)[-1]
        if self.picks(operation, request.url) or self.random.random() < self.share:
            self.refused += 1
            request.refused_url, request.url = request.url, "https://refused.invalid/"
            return AWSResponse(request.refused_url, 503, {"Content-Type": "application/xml"}, _Body(SLOW_DOWN))
        return None

    def on(self, client: Any) -> Any:
        # First, so its answer is the one botocore takes.
        client.meta.events.register_first("before-send.s3", self)
        return client

    def on_session(self, session: boto3.Session) -> None:
        """On every client the session makes from now on."""
        session.events.register_first("before-send.s3", self)


@pytest.fixture
def config(tiny_config: Path, tiny_checkpoint: Path) -> WorkerConfig:
    return replace(tiny_worker_config(tiny_config, tiny_checkpoint), transient_retry_s=0, max_attempts=3)


def photos(count: int) -> dict[str, bytes]:
    return {f"img-{i:02d}.png": encode(photo().rotate(i * 7), "PNG") for i in range(count)}


def outcomes(s3: Any, mid: str, names: list[str]) -> dict[str, str | None]:
    """name -> created, the failure's code, or None when the worker recorded nothing for it."""
    events = stored_events(s3, mid)
    return {
        name: None
        if name not in events
        else events[name]["data"]["error"]["code"]
        if events[name]["type"] == "document-failed"
        else "created"
        for name in names
    }


def quick_client() -> Any:
    """Gives up after two tries, so a test of what follows S3's retries does not wait a minute."""
    return boto3.client("s3", config=Config(retries={"max_attempts": 2, "mode": "standard"}))


def test_with_a_fifth_of_all_s3_requests_throttled_every_image_is_embedded_once(s3: Any, config: WorkerConfig) -> None:
    files = photos(16)
    uri = put_manifest(s3, upload(s3, files))
    faults = SlowDown(share=0.25)
    worker_s3 = faults.on(s3_client(config))

    summary = run(replace(config, manifest_uri=uri), s3=worker_s3)

    assert faults.refused / faults.requests >= 0.2, (faults.refused, faults.requests)
    assert summary.exit_code == EXIT_OK
    assert set(outcomes(s3, model_id(config), list(files)).values()) == {"created"}
    rows = read_shard(s3, summary.shard_url).column("key").to_pylist()
    assert sorted(rows) == sorted(files)


def test_an_object_s3_will_not_serve_is_left_to_the_next_attempt_without_a_record(s3: Any, config: WorkerConfig) -> None:
    files = photos(6)
    uri = put_manifest(s3, upload(s3, files))
    throttled = SlowDown(picks=lambda operation, url: operation == "GetObject" and url.endswith("/img-03.png"))

    first = run(replace(config, manifest_uri=uri), s3=throttled.on(quick_client()))

    assert first.exit_code == EXIT_RETRY
    assert (first.progress.embedded, first.progress.deferred, first.progress.failed) == (5, 1, 0)
    mid = model_id(config)
    assert outcomes(s3, mid, list(files)) == {name: None if name == "img-03.png" else "created" for name in files}

    # Batch retries exit code 75: the next attempt embeds what is left and reuses the rest.
    second = run(replace(config, manifest_uri=uri, attempt=2), s3=quick_client())
    assert second.exit_code == EXIT_OK
    assert (second.progress.embedded, second.progress.skipped) == (1, 5)
    assert set(outcomes(s3, mid, list(files)).values()) == {"created"}
    assert sorted(read_shard(s3, second.shard_url).column("key").to_pylist()) == sorted(files)


def test_the_last_attempt_records_what_s3_never_served(s3: Any, config: WorkerConfig) -> None:
    files = photos(3)
    uri = put_manifest(s3, upload(s3, files))
    throttled = SlowDown(picks=lambda operation, url: operation == "GetObject" and url.endswith("/img-01.png"))

    summary = run(replace(config, manifest_uri=uri, attempt=3), s3=throttled.on(quick_client()))

    assert summary.exit_code == EXIT_OK
    event = stored_events(s3, model_id(config))["img-01.png"]
    assert event["type"] == "document-failed"
    assert event["data"]["error"]["code"] == "download-failed"
    message = event["data"]["error"]["message"]
    assert f"s3://{INPUT_BUCKET}/img-01.png" in message and "SlowDown" in message and "attempt 3 of 3" in message


def test_an_object_archived_after_dispatch_fails_at_once_with_the_dispatchers_code(s3: Any, config: WorkerConfig) -> None:
    files = photos(3)
    uri = put_manifest(s3, upload(s3, files))
    # A lifecycle rule moved it to Glacier while the job waited for a GPU: the same bytes, not served.
    s3.put_object(Bucket=INPUT_BUCKET, Key="img-01.png", Body=files["img-01.png"], StorageClass="GLACIER")

    summary = run(replace(config, manifest_uri=uri), s3=quick_client())

    # Not left to a next attempt (S3 would answer the same): recorded on the first.
    assert summary.exit_code == EXIT_OK
    assert outcomes(s3, model_id(config), list(files)) == {
        "img-00.png": "created",
        "img-01.png": "object-archived",
        "img-02.png": "created",
    }


def test_outputs_s3_would_not_store_make_the_attempt_end_for_a_retry(s3: Any, config: WorkerConfig) -> None:
    files = photos(4)
    uri = put_manifest(s3, upload(s3, files))
    mid = model_id(config)
    events_key = keys.events_key("", mid, "m-1", 0)
    throttled = SlowDown(picks=lambda operation, url: operation == "PutObject" and url.endswith(events_key))

    first = run(replace(config, manifest_uri=uri), s3=throttled.on(quick_client()))
    assert first.exit_code == EXIT_RETRY and first.progress.write_errors == 1

    # Without its events batch the child's work is not known to be done: the retry does it again.
    second = run(replace(config, manifest_uri=uri, attempt=2), s3=quick_client())
    assert second.exit_code == EXIT_OK and second.progress.embedded == 4
    assert set(outcomes(s3, mid, list(files)).values()) == {"created"}


def test_a_manifest_s3_will_not_serve_now_is_retried_not_failed(
    s3: Any, config: WorkerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's client tries eight times; without the waits between tries this takes a second.
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0)
    uri = put_manifest(s3, upload(s3, photos(1)))
    for name, value in {"MANIFEST_URI": uri, "OUTPUT_BUCKET": OUTPUT_BUCKET, "DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    boto3.setup_default_session()
    SlowDown(picks=lambda operation, url: operation == "GetObject").on_session(boto3.DEFAULT_SESSION)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert main() == EXIT_RETRY
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        boto3.DEFAULT_SESSION = None


def worker_environment(endpoint: str, config: WorkerConfig, uri: str, sitecustomize: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "PYTHONPATH": os.pathsep.join([str(sitecustomize), os.environ.get("PYTHONPATH", "")]),
        "MANIFEST_URI": uri,
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "CLIP_MODEL": TINY_MODEL,
        "CLIP_MODEL_CONFIG": str(config.model_config_path),
        "CLIP_PRETRAINED": str(config.pretrained),
        "DEVICE": "cpu",
        "BATCH_SIZE": "2",
        "IO_THREADS": "1",
        "JOB_ATTEMPTS": "3",
    }


def test_an_image_that_kills_its_decoder_fails_alone_and_the_attempt_goes_on(
    moto_endpoint: str, config: WorkerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding runs in helper processes (sandbox.py): a codec crash takes down a helper, never the
    worker, and that image alone is failed, in the same attempt."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    s3 = boto3.client("s3")
    for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
        s3.create_bucket(Bucket=bucket)
    files = photos(10)
    files["img-05.png"] = poisoned_png()
    # Decoded by the helper that replaces the dead one, or by the other: its failure comes back as itself.
    files["img-06.png"] = encode(photo(), "JPEG")[:2000]
    uri = put_manifest(s3, upload(s3, files))
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = worker_environment(moto_endpoint, config, uri, tmp_path)

    first = subprocess.run(
        [sys.executable, "-m", "clip_worker"],
        env={**env, "AWS_BATCH_JOB_ATTEMPT": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert first.returncode == EXIT_OK, first.stdout[-4000:]
    mid = model_id(config)
    found = outcomes(s3, mid, list(files))
    failures = {"img-05.png": "crashes-worker", "img-06.png": "corrupt-image"}
    assert found == {name: failures.get(name, "created") for name in files}
    reason = stored_events(s3, mid)["img-05.png"]["data"]["error"]["message"]
    assert f"s3://{INPUT_BUCKET}/img-05.png" in reason and "killed" in reason and "SIGKILL" in reason
    shard = read_shard(s3, keys.s3_url(OUTPUT_BUCKET, keys.parquet_key("", mid, "m-1", 0)))
    assert sorted(shard.column("key").to_pylist()) == sorted(name for name in files if name not in failures)


def test_the_object_alone_in_flight_when_an_attempt_died_is_failed_without_being_read_again(
    s3: Any, config: WorkerConfig
) -> None:
    files = photos(5)
    uri = put_manifest(s3, upload(s3, files))
    # What the journal holds after an attempt died while img-02 alone was being embedded.
    died = {"state": "running", "attempt": 1, "window": [0, 0], "careful": 2, "suspects": [2, 3]}
    s3.put_object(Bucket=OUTPUT_BUCKET, Key=keys.journal_key("", "m-1", 0), Body=json.dumps(died).encode())
    # Had it been read again, it would be object-not-found.
    s3.delete_object(Bucket=INPUT_BUCKET, Key="img-02.png")

    summary = run(replace(config, manifest_uri=uri, attempt=2, io_threads=1), s3=s3)

    assert summary.exit_code == EXIT_OK
    found = outcomes(s3, model_id(config), list(files))
    assert found == {name: "crashes-worker" if name == "img-02.png" else "created" for name in files}
    assert "attempt 1" in stored_events(s3, model_id(config))["img-02.png"]["data"]["error"]["message"]


def test_a_child_that_fits_one_window_writes_no_journal_and_one_that_leaves_work_says_it_exited(
    s3: Any, config: WorkerConfig
) -> None:
    uri = put_manifest(s3, upload(s3, photos(3)))
    assert run(replace(config, manifest_uri=uri), s3=s3).exit_code == EXIT_OK
    assert "Contents" not in s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="journal/")

    # An attempt that leaves work to a retry is no crash: the next one has nothing to suspect.
    throttled = SlowDown(picks=lambda operation, url: operation == "GetObject" and url.endswith("/img-01.png"))
    uri = put_manifest(s3, upload(s3, photos(3)), manifest_id="m-2")
    assert run(replace(config, manifest_uri=uri), s3=throttled.on(quick_client())).exit_code == EXIT_RETRY
    journal = json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=keys.journal_key("", "m-2", 0))["Body"].read())
    assert journal["state"] == "exited"
    again = run(replace(config, manifest_uri=uri, attempt=2), s3=s3)
    assert (again.exit_code, again.progress.skipped, again.progress.embedded) == (EXIT_OK, 2, 1)
