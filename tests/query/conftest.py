"""The query API on real HTTP: a moto server whose output bucket holds what the real worker wrote for
real photos, and the API served by uvicorn on loopback, as `clip-pipeline serve` runs it."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import uvicorn
from fastapi import FastAPI
from moto.server import ThreadedMotoServer

from clip_query.api import create_app
from clip_query.config import QueryConfig
from clip_query.service import QueryService
from clip_shared import keys
from clip_store import StorageSettings, VectorStore, ingest_shards, store_uri
from clip_worker.config import WorkerConfig
from clip_worker.model import ClipModel, load
from clip_worker.runner import EXIT_OK, run
from clip_worker.sandbox import Sandbox
from tests.support import (
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    PHOTOS,
    TINY_MODEL,
    encode,
    photo,
    put_manifest,
    tiny_worker_config,
    upload,
)

#: What the worker has embedded before the API starts: four real photos in three formats.
STORED = {
    "photos/cat.jpg": encode(photo("chelsea.png"), "JPEG", quality=90),
    "photos/astronaut.png": encode(photo("astronaut.png"), "PNG"),
    "photos/coffee.webp": encode(photo("coffee.png"), "WEBP", quality=90),
    "photos/rocket.jpg": (PHOTOS / "rocket.jpg").read_bytes(),
}
#: Limits small enough to reach in a test.
LIMITS = {
    "MAX_ITEMS": "6",
    "MAX_BODY_BYTES": "2000000",
    "MAX_IMAGE_PIXELS": "4000000",
    "MAX_REQUEST_PIXELS": "6000000",
    "MAX_TEXT_CHARS": "2000",
    "MAX_LABELS": "50",
    "MAX_RESULTS": "20",
}


@dataclass(frozen=True)
class Stored:
    endpoint: str
    s3: Any
    worker: WorkerConfig
    #: The decoding processes of the services made here, closed with the module's stored outputs.
    sandboxes: list[Sandbox] = field(default_factory=list)

    @property
    def storage(self) -> StorageSettings:
        """The vector store's S3 settings: LanceDB's own client, pointed at the same emulator."""
        return StorageSettings(endpoint=self.endpoint, region="us-east-1")

    def service(self, config: QueryConfig, model: ClipModel) -> QueryService:
        self.sandboxes.append(Sandbox(config.decode_limits, config.decode_workers))
        return QueryService(config, self.s3, model, self.storage, self.sandboxes[-1])


def embed_with_worker(stored: Stored, files: dict[str, bytes], manifest_id: str) -> None:
    """Run the real worker over `files` (uploaded to the input bucket), as a Batch job would, then put its
    shard into the vector store, as the indexer does when S3 tells it the shard is there."""
    entries = upload(stored.s3, files)
    config = replace(stored.worker, manifest_uri=put_manifest(stored.s3, entries, manifest_id=manifest_id))
    summary = run(config, s3=stored.s3)
    assert summary.exit_code == EXIT_OK and summary.shard_url is not None
    model_id = keys.model_id(config.model, config.pretrained)
    store = VectorStore(store_uri(OUTPUT_BUCKET, "", model_id), settings=stored.storage)
    ingest_shards(store, stored.s3, [summary.shard_url])


@pytest.fixture(scope="module")
def stored(tiny_config: Path, tiny_checkpoint: Path) -> Iterator[Stored]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            patch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        worker = tiny_worker_config(tiny_config, tiny_checkpoint)
        result = Stored(endpoint, s3, worker)
        embed_with_worker(result, STORED, "m-stored")
        yield result
    for sandbox in result.sandboxes:
        sandbox.close()
    server.stop()


def query_env(tiny_config: Path, tiny_checkpoint: Path) -> dict[str, str]:
    """The API's environment for the tiny model over the stored vectors, limits left at their defaults."""
    return {
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "CLIP_MODEL": TINY_MODEL,
        "CLIP_PRETRAINED": str(tiny_checkpoint),
        "CLIP_MODEL_CONFIG": str(tiny_config),
        "INDEX_REFRESH_SECONDS": "0",
    }


@pytest.fixture(scope="module")
def query_config(stored: Stored, tiny_config: Path, tiny_checkpoint: Path) -> QueryConfig:
    return QueryConfig.from_env({**query_env(tiny_config, tiny_checkpoint), **LIMITS})


@pytest.fixture(scope="module")
def model(query_config: QueryConfig) -> ClipModel:
    return load(query_config.model, query_config.pretrained, "cpu", model_config_path=query_config.model_config_path)


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """The application on uvicorn, on a free loopback port, as `clip-pipeline serve` runs it; its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def api(stored: Stored, query_config: QueryConfig, model: ClipModel) -> Iterator[str]:
    """The API's base URL, with limits small enough to reach in a test."""
    with served(create_app(query_config, stored.service(query_config, model))) as url:
        yield url


@pytest.fixture(scope="module")
def default_api(stored: Stored, tiny_config: Path, tiny_checkpoint: Path, model: ClipModel) -> Iterator[str]:
    """The API's base URL with the limits a deployment gets (only the model is the tiny one)."""
    config = QueryConfig.from_env(query_env(tiny_config, tiny_checkpoint))
    with served(create_app(config, stored.service(config, model))) as url:
        yield url
