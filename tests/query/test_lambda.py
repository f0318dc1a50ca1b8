"""The Lambda entry point with the sample events in events/ (what `sam local invoke QueryFunction -e` sends)."""

from __future__ import annotations

import importlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
import requests

from clip_pipeline.local import LambdaContext
from tests.conftest import OUTPUT_BUCKET
from tests.support import TINY_MODEL

EVENTS = Path(__file__).resolve().parents[2] / "events"


@pytest.fixture
def lambda_function(
    moto_endpoint: str, tiny_config: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """clip_query.lambda_function imported as Lambda's runtime imports it: configured by its environment,
    S3 on moto's server (the vector store's own S3 client reaches it over the network, as on AWS)."""
    for name, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "CLIP_MODEL": TINY_MODEL,
        "CLIP_PRETRAINED": str(tiny_checkpoint),
        "CLIP_MODEL_CONFIG": str(tiny_config),
        "CLIP_LABELS": "default",
        "POWERTOOLS_SERVICE_NAME": "clip-query",
        "POWERTOOLS_METRICS_NAMESPACE": "ClipPipelineTest",
    }.items():
        monkeypatch.setenv(name, value)
    # moto keeps its accounts in the process, whichever server serves them: start empty.
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=30)
    boto3.client("s3").create_bucket(Bucket=OUTPUT_BUCKET)
    sys.modules.pop("clip_query.lambda_function", None)
    yield importlib.import_module("clip_query.lambda_function")
    sys.modules.pop("clip_query.lambda_function", None)


def invoke(module: ModuleType, name: str) -> tuple[dict[str, Any], Any]:
    event = json.loads((EVENTS / name).read_text())
    response = module.handler(event, LambdaContext("clip-query", 29))
    return response, json.loads(response["body"])


def test_sample_events_answer_through_the_lambda_entry_point(
    lambda_function: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = io.StringIO()
    # The JSON log lines, however pytest captures the stream the logger was created with.
    previous = lambda_function.logger.registered_handler.setStream(logs)
    response, vector = invoke(lambda_function, "query-embed-text.json")
    assert response["statusCode"] == 200 and len(vector) == 32
    assert response["headers"]["x-request-id"] == "sample-embed-1"

    response, image_vector = invoke(lambda_function, "query-embed-image.json")
    assert response["statusCode"] == 200 and len(image_vector) == 32

    response, body = invoke(lambda_function, "query-classify.json")
    assert response["statusCode"] == 200
    assert [label["label"] for label in body["images"]["image"]][:1] and len(body["images"]["image"]) == 3
    assert {label["label"] for label in body["images"]["image"]} <= {"cat", "dog", "rocket", "coffee"}

    response, body = invoke(lambda_function, "query-search-text.json")
    assert response["statusCode"] == 200
    assert body["results"] == [] and body["indexed"] == 0  # nothing embedded in this bucket yet

    lambda_function.logger.registered_handler.setStream(previous)
    # Powertools: the request id in the access log line, and one EMF metric document per invocation.
    requests_logged = [json.loads(line) for line in logs.getvalue().splitlines() if '"message":"request"' in line]
    assert [line["request_id"] for line in requests_logged] == [
        "sample-embed-1",
        "sample-embed-image-1",
        "sample-classify-1",
        "sample-search-1",
    ]
    assert capsys.readouterr().out.count('"Responses2xx":[1.0]') == 4
