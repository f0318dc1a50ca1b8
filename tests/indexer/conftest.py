"""The indexer's world: its handler loaded as Lambda would (environment of events/env.json), the real
worker to make its shards, and a moto server (LanceDB reaches S3 through its own client, so an
in-process mock would not do), with a versioned input bucket and the dispatcher's queue."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
import requests

from clip_pipeline import local
from clip_shared import keys
from clip_store import StorageSettings, VectorStore, store_uri
from clip_worker.runner import EXIT_OK, run
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET, put_manifest, tiny_worker_config, upload

EVENTS = Path(__file__).resolve().parents[2] / "events"
#: The dispatcher's size limit in these tests: an object past it is rejected (too-large).
MAX_OBJECT_BYTES = 200_000


def sample(name: str, bucket: str, key: str, event_name: str | None = None) -> dict[str, Any]:
    """A sample event of events/, about `bucket` and `key` (URL-encoded, as S3 writes keys)."""
    event = copy.deepcopy(json.loads((EVENTS / name).read_text()))
    body = json.loads(event["Records"][0]["body"])
    body["Records"][0]["s3"]["bucket"]["name"] = bucket
    body["Records"][0]["s3"]["object"]["key"] = quote_plus(key)
    if event_name is not None:
        body["Records"][0]["eventName"] = event_name
    event["Records"][0]["body"] = json.dumps(body)
    return event


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    records = [record for event in events for record in event["Records"]]
    return {"Records": [{**record, "messageId": f"message-{n}"} for n, record in enumerate(records)]}


def urls(*names: str) -> list[str]:
    return [keys.s3_url(INPUT_BUCKET, name) for name in names]


@dataclass
class World:
    s3: Any
    #: Uploads files and runs the real worker over them; returns its shard's key.
    embed: Callable[[dict[str, bytes], str], str]
    invoke: Callable[[dict[str, Any]], dict[str, Any]]
    store: VectorStore
    model_id: str
    #: The dispatcher's queue, where the indexer sends a version a removal uncovered.
    upload_queue: str
    #: The real dispatcher handler (nothing it accepts can be submitted here: no Batch queue exists).
    dispatch: Callable[[dict[str, Any]], dict[str, Any]]
    #: The index job's queue (INDEX_JOB_QUEUE): where the indexer submits trainings past its bound.
    job_queue: str = ""

    def training_jobs(self) -> list[dict[str, Any]]:
        """Every job submitted to the index job's queue, whatever its state."""
        batch = boto3.client("batch")
        states = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")
        return [job for state in states for job in batch.list_jobs(jobQueue=self.job_queue, jobStatus=state)["jobSummaryList"]]

    def uploaded(self, key: str) -> dict[str, Any]:
        return sample("sqs-s3-put-not-an-image.json", INPUT_BUCKET, key)

    def rejection_marker(self, key: str) -> dict[str, Any]:
        """The notification S3 sends the indexer for any object created under `rejected/`."""
        return sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, key)

    def rejection_written(self, key: str) -> dict[str, Any]:
        """The notification S3 sends the indexer for the dispatcher's rejection record of `key`."""
        return sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, keys.rejection_key("", INPUT_BUCKET, key))

    def shard_created(self, key: str) -> dict[str, Any]:
        return sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, key)

    def removed(self, key: str, event_name: str = "ObjectRemoved:DeleteMarkerCreated") -> dict[str, Any]:
        return sample("sqs-s3-object-removed.json", INPUT_BUCKET, key, event_name)

    def sent_to_dispatcher(self) -> list[tuple[str, str]]:
        """(key, ETag) of each object the indexer sent back to be embedded, as the dispatcher would read them."""
        sqs = boto3.client("sqs")
        found = []
        while messages := sqs.receive_message(QueueUrl=self.upload_queue, MaxNumberOfMessages=10).get("Messages", []):
            for message in messages:
                for record in json.loads(message["Body"])["Records"]:
                    found.append((keys.notified_key(record["s3"]["object"]["key"]), record["s3"]["object"]["eTag"]))
                sqs.delete_message(QueueUrl=self.upload_queue, ReceiptHandle=message["ReceiptHandle"])
        return found


def index_jobs(moto_endpoint: str) -> tuple[str, str]:
    """The stack's job queue and index job definition (template.yaml), jobs never run (no Docker)."""
    requests.post(f"{moto_endpoint}/moto-api/config", json={"batch": {"use_docker": False}}, timeout=30)
    batch = boto3.client("batch")
    role = boto3.client("iam").create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    environment = batch.create_compute_environment(
        computeEnvironmentName="gpu", type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    queue = batch.create_job_queue(
        jobQueueName="jobs",
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment}],
    )["jobQueueArn"]
    definition = batch.register_job_definition(
        jobDefinitionName="index",
        type="container",
        containerProperties={
            "image": "local/x:1",
            "command": ["python", "-m", "clip_indexer.train"],
            "vcpus": 4,
            "memory": 14000,
        },
    )["jobDefinitionArn"]
    return queue, definition


@pytest.fixture
def world(
    request: pytest.FixtureRequest, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tiny_config: Path, tiny_checkpoint: Path
) -> Iterator[World]:
    """The function as deployed; parametrize it with settings to override."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    # moto keeps its accounts in the process, whichever server serves them: each test starts empty.
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=30)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=INPUT_BUCKET)
    s3.put_bucket_versioning(Bucket=INPUT_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    s3.create_bucket(Bucket=OUTPUT_BUCKET)
    upload_queue = boto3.client("sqs").create_queue(QueueName="uploads")["QueueUrl"]
    job_queue, job_definition = index_jobs(moto_endpoint)
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    model_id = keys.model_id(config.model, config.pretrained)
    # The function's environment as template.yaml gives it (events/env.json), set through monkeypatch
    # so that it leaves with the test; loading the handler reads it, as Lambda's init would.
    environment = {
        **json.loads((EVENTS / "env.json").read_text())["IndexerFunction"],
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "UPLOAD_QUEUE_URL": upload_queue,
        "INDEX_JOB_QUEUE": job_queue,
        "INDEX_JOB_DEFINITION": job_definition,
        **getattr(request, "param", {}),
    }
    with monkeypatch.context() as patch:
        for name, value in {**environment, "POWERTOOLS_TRACE_DISABLED": "true"}.items():
            patch.setenv(name, value)
        dispatcher_environment = {
            **json.loads((EVENTS / "env.json").read_text())["Dispatcher"],
            "OUTPUT_BUCKET": OUTPUT_BUCKET,
            "MAX_OBJECT_BYTES": str(MAX_OBJECT_BYTES),
        }
        with contextlib.redirect_stdout(io.StringIO()):
            handler = local.load_handler(local.INDEXER, dict(environment))
            for name, value in dispatcher_environment.items():
                patch.setenv(name, value)
            dispatcher = local.load_handler(local.DISPATCHER, dispatcher_environment)

        def embed(files: dict[str, bytes], manifest_id: str) -> str:
            uri = put_manifest(s3, upload(s3, files), manifest_id=manifest_id)
            summary = run(replace(config, manifest_uri=uri), s3=s3)
            assert summary.exit_code == EXIT_OK and summary.shard_url is not None
            return keys.parse_s3_url(summary.shard_url)[1]

        def invoke(event: dict[str, Any]) -> dict[str, Any]:
            # Its log lines and metrics go to stdout, as on Lambda (capsys reads them).
            return handler(event, local.LambdaContext("indexer", 900))

        def dispatch(event: dict[str, Any]) -> dict[str, Any]:
            return dispatcher(event, local.LambdaContext("dispatcher", 900))

        settings = StorageSettings(endpoint=moto_endpoint, region="us-east-1")
        store = VectorStore(store_uri(OUTPUT_BUCKET, "", model_id), settings=settings)
        yield World(s3, embed, invoke, store, model_id, upload_queue, dispatch, job_queue)
    # The server outlives the test: leave nothing in it for the next module's tests to find.
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=30)
