"""Constants and helpers shared by the dispatcher tests (a module name no other test folder uses)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import numpy as np
from botocore.awsrequest import AWSResponse
from moto.core.botocore_stubber import MockRawResponse
from moto.core.models import botocore_stubber
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
INPUT_BUCKET = "clip-input-example"  # the bucket events/*.json name
OUTPUT_BUCKET = "clip-output-test"
OUTPUT_PREFIX = "out"
JOB_QUEUE = "clip-gpu-queue"
JOB_DEFINITION = "clip-embed"
SHARD_SIZE = 3
MAX_OBJECT_BYTES = 1_000_000


@dataclass(frozen=True)
class FakeLambdaContext:
    function_name: str = "clip-pipeline-Dispatcher"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:clip-pipeline-Dispatcher"
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e812345678"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


def _photo(name: str) -> Image.Image:
    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((256, 256))
    return image


def encode(name: str, fmt: str) -> bytes:
    """A real photo from scikit-image's data, encoded by Pillow."""
    buffer = io.BytesIO()
    _photo(name).save(buffer, format=fmt)
    return buffer.getvalue()


def noise_png(min_bytes: int) -> bytes:
    """A PNG that does not compress below `min_bytes`."""
    side = int((min_bytes / 3) ** 0.5) + 16
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def put_input(key: str, body: bytes, content_type: str) -> None:
    boto3.client("s3").put_object(Bucket=INPUT_BUCKET, Key=key, Body=body, ContentType=content_type)


def load_event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text(encoding="utf-8"))


def submitted_jobs() -> list[dict[str, Any]]:
    """Every job submitted to the queue, whatever its state (a name filter lists all states).

    Array children (ids `parent:index`) are the parent's shards, not separate submissions.
    """
    batch = boto3.client("batch")
    summaries = batch.list_jobs(jobQueue=JOB_QUEUE, filters=[{"name": "JOB_NAME", "values": ["*"]}])["jobSummaryList"]
    job_ids = [summary["jobId"] for summary in summaries if ":" not in summary["jobId"]]
    return batch.describe_jobs(jobs=job_ids)["jobs"] if job_ids else []


def read_output(key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read()


def output_keys(prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=OUTPUT_BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def environment_of(job: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in job["container"].get("environment", [])}


@contextmanager
def failing_submit_job(batch_client: Any, status: int, code: str, times: int | None = None) -> Iterator[list[Any]]:
    """Make the dispatcher's Batch client see `code` from SubmitJob (`times` times, or always).

    The error arrives where the HTTP response would, so botocore's own retry logic handles it.
    botocore calls every before-send handler, so moto's is swapped for one that reaches moto
    only with the attempts that are let through.
    """
    attempts: list[Any] = []

    def respond(event_name: str, request: Any, **kwargs: Any) -> AWSResponse | None:
        if not event_name.endswith(".SubmitJob"):
            return botocore_stubber(event_name, request, **kwargs)
        attempts.append(request)
        if times is not None and len(attempts) > times:
            return botocore_stubber(event_name, request, **kwargs)
        body = json.dumps({"__type": code, "message": f"injected {code}"}).encode()
        headers = {"x-amzn-ErrorType": code, "Content-Type": "application/json"}
        return AWSResponse(request.url, status, headers, MockRawResponse(body))

    events = batch_client.meta.events
    events.unregister("before-send", botocore_stubber)
    events.register("before-send", respond)
    try:
        yield attempts
    finally:
        events.unregister("before-send", respond)
        events.register("before-send", botocore_stubber)


@contextmanager
def refusing_get_object(s3_client: Any, answers: dict[str, tuple[int, str, str]]) -> Iterator[None]:
    """Make GetObject of each key in `answers` get S3's (status, code, message) error, as S3 answers an
    object encrypted with a key the caller lacks (moto serves such objects), the rest reaching moto."""

    def respond(event_name: str, request: Any, **kwargs: Any) -> AWSResponse | None:
        path = unquote(urlsplit(request.url).path).lstrip("/")
        key = path.removeprefix(f"{INPUT_BUCKET}/")  # path-style or virtual-hosted addressing
        if not event_name.endswith(".GetObject") or key not in answers:
            return botocore_stubber(event_name, request, **kwargs)
        status, code, message = answers[key]
        body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, MockRawResponse(body))

    events = s3_client.meta.events
    events.unregister("before-send", botocore_stubber)
    events.register("before-send", respond)
    try:
        yield
    finally:
        events.unregister("before-send", respond)
        events.register("before-send", botocore_stubber)
