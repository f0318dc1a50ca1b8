from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from tests.support import (
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    register_tiny_model,
    save_tiny_checkpoint,
)


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and a region, and no endpoint of the developer's leaking in."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3")
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            client.create_bucket(Bucket=bucket)
        yield client


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return register_tiny_model(tmp_path_factory.mktemp("model-config"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    """A real moto server on a free loopback port, for code that runs in other processes."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request would drown test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
