"""The query API's Lambda function inside a benchmark's process: `clip_query.lambda_function` imported
as Lambda's runtime imports it (configured by its environment, S3 on moto's server in this process), and
invoked with the sample events of events/, their bodies replaced."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import boto3
from aws_lambda_powertools.logging.filters import SuppressFilter
from moto.server import ThreadedMotoServer

from bench._harness import REPOSITORY
from bench.cold_child import LambdaContext

EVENTS = REPOSITORY / "events"
OUTPUT_BUCKET = "bench-query-output"
STORED_BUCKET = "bench-query-input"
FUNCTION_NAME = "clip-query"
#: The template's default QueryMemorySize: Lambda gives it about 1.7 vCPUs' worth of time
#: (one per 1,769 MB), where the machine these benchmarks were run on has 2.
MEMORY_MB = 3008
#: API Gateway's integration timeout, which the function's own (29 s) sits under.
TIMEOUT_S = 29


def clean_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment with fake AWS credentials, none of the developer's endpoints, and `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ID")
    }
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    env.update(extra)
    return env


def function_environment(model: str, model_config: str | None, checkpoint: Path, cache_dir: Path) -> dict[str, str]:
    """What the image and the template give the QueryFunction, with the weights as a checkpoint file."""
    env = {
        "CLIP_CACHE_DIR": str(cache_dir),
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "OUTPUT_PREFIX": "",
        "CLIP_MODEL": model,
        "CLIP_PRETRAINED": str(checkpoint),
        "CLIP_LABELS": "default",
        "HF_HUB_OFFLINE": "1",
        # Lambda has no GPU: the model loads on the CPU even where this runs on a GPU machine.
        "CUDA_VISIBLE_DEVICES": "",
        "POWERTOOLS_SERVICE_NAME": FUNCTION_NAME,
        "POWERTOOLS_METRICS_NAMESPACE": "ClipPipelineBench",
    }
    if model_config:
        env["CLIP_MODEL_CONFIG"] = str(Path(model_config).resolve())
    return env


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's server on a free loopback port, with the output bucket; yields its endpoint URL.

    A server rather than moto's in-process mock: the vector store's S3 client (LanceDB's, in Rust)
    reaches S3 over the network, as it does on AWS.
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=OUTPUT_BUCKET)
        yield endpoint
    finally:
        server.stop()


@contextmanager
def entry_point(env: dict[str, str]) -> Iterator[ModuleType]:
    """clip_query.lambda_function imported as Lambda's runtime imports it, on moto's server."""
    # Powertools loggers propagate to the root logger. In Lambda, Powertools filters its records out
    # of the runtime's root handler, which exists before the function is imported; a root handler
    # added later here (open_clip's logging.warning adds one) would print every log line twice.
    suppress = SuppressFilter(FUNCTION_NAME)
    for handler in logging.root.handlers:
        handler.addFilter(suppress)
    with (
        moto_server() as endpoint,
        mock.patch.dict(os.environ, clean_environment({**env, "AWS_ENDPOINT_URL": endpoint}), clear=True),
        open(os.devnull, "w") as devnull,
    ):
        sys.modules.pop("clip_query.lambda_function", None)
        try:
            module = importlib.import_module("clip_query.lambda_function")
            for handler in logging.root.handlers:  # and any that loading the model added
                handler.addFilter(suppress)
            previous = module.logger.registered_handler.setStream(devnull)
            try:
                yield module
            finally:
                module.logger.registered_handler.setStream(previous)
        finally:
            sys.modules.pop("clip_query.lambda_function", None)
            for handler in logging.root.handlers:
                handler.removeFilter(suppress)


def event(template: str, **changes: Any) -> dict[str, Any]:
    """One of the sample events in events/, with its path, body or query string replaced."""
    document = json.loads((EVENTS / template).read_text())
    if "path" in changes:
        document["rawPath"] = document["requestContext"]["http"]["path"] = changes["path"]
        document["pathParameters"]["proxy"] = changes["path"].lstrip("/")
    if "body" in changes:
        document["body"] = changes["body"]
        document["headers"]["content-length"] = str(len(changes["body"].encode()))
    if "query" in changes:
        document["rawQueryString"] = "&".join(f"{name}={value.replace(' ', '+')}" for name, value in changes["query"].items())
        document["queryStringParameters"] = changes["query"]
    return document


def invoke(entry: ModuleType, request: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds the handler took, and its response (the EMF metrics it prints go nowhere)."""
    request = copy.deepcopy(request)
    context = LambdaContext(FUNCTION_NAME, TIMEOUT_S, MEMORY_MB)
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        started = time.perf_counter()
        response = entry.handler(request, context)
        return time.perf_counter() - started, response
