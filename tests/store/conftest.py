from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.support import INPUT_BUCKET, OUTPUT_BUCKET


@pytest.fixture
def s3_endpoint(aws_environment: None, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto server that boto3 and LanceDB's own S3 client (and child processes) all reach
    through the standard AWS_ENDPOINT_URL, with the pipeline's two buckets."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    client = boto3.client("s3")
    for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
        client.create_bucket(Bucket=bucket)
    yield moto_endpoint


@pytest.fixture
def local_uri(tmp_path: Path) -> str:
    return str(tmp_path / "store")
