"""The Lambda lane: the dispatcher's choice of lane, the embedding function, and its hand-over to Batch.

The dispatcher and the embedding function are loaded from their app.py files with the environment
template.yaml gives them (EmbedLane auto), in one moto account holding the buckets, both lane
queues and the job queue; the Batch job a hand-over submits is run with the worker's own runner and
the environment Batch would give its container.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from moto import mock_aws
from PIL import Image

from clip_pipeline import jobs
from clip_shared import keys, notifications
from clip_shared.lane import EmbedLane, LaneRequest
from clip_worker.config import WorkerConfig
from clip_worker.runner import EXIT_OK, run
from tests import hostile
from tests.support import (
    AWKWARD_KEYS,
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    SITECUSTOMIZE,
    TINY_MODEL,
    cosine,
    encode,
    photo,
    poisoned_png,
    reference_embedding,
    stored_events,
    stored_vectors,
)

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
MAX_IMAGES = 3
JOB_ATTEMPTS = 5
CONTEXT_TIMEOUT_S = 900


class Context:
    """Lambda's context object, as much of it as the handlers and Powertools read."""

    function_name = "clip-pipeline-embed"
    memory_limit_in_mb = 3008
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:clip-pipeline-embed"
    aws_request_id = "0f6d6a6e-2b9a-4c61-9d35-5b0f3c1f3a10"

    def __init__(self, remaining_ms: int = CONTEXT_TIMEOUT_S * 1000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def load_app(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Lane:
    """The account, the two functions, and what flows between them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tiny_config: Path, tiny_checkpoint: Path) -> None:
        self.s3 = boto3.client("s3")
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            self.s3.create_bucket(Bucket=bucket)
        self.s3.put_bucket_versioning(Bucket=INPUT_BUCKET, VersioningConfiguration={"Status": "Enabled"})
        self.sqs = boto3.client("sqs")
        self.fallback_url = self.sqs.create_queue(QueueName="lane-fallback")["QueueUrl"]
        fallback_arn = self.sqs.get_queue_attributes(QueueUrl=self.fallback_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.embed_url = self.sqs.create_queue(
            QueueName="embed",
            Attributes={"RedrivePolicy": json.dumps({"deadLetterTargetArn": fallback_arn, "maxReceiveCount": 1})},
        )["QueueUrl"]
        self.batch = boto3.client("batch")
        role = boto3.client("iam").create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        environment_arn = self.batch.create_compute_environment(
            computeEnvironmentName="gpu", type="UNMANAGED", state="ENABLED", serviceRole=role
        )["computeEnvironmentArn"]
        self.batch.create_job_queue(
            jobQueueName="gpu-queue",
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment_arn}],
        )
        self.batch.register_job_definition(
            jobDefinitionName="embed", type="container", containerProperties={"image": "worker", "vcpus": 1, "memory": 512}
        )
        self.model_id = keys.model_id(TINY_MODEL, str(tiny_checkpoint))
        self.tiny_checkpoint = tiny_checkpoint
        shared = {
            "OUTPUT_BUCKET": OUTPUT_BUCKET,
            "OUTPUT_PREFIX": "",
            "POWERTOOLS_METRICS_NAMESPACE": "ClipPipeline",
            "POWERTOOLS_TRACE_DISABLED": "true",
        }
        # As template.yaml's Dispatcher (EmbedLane auto) and EmbedFunction give them.
        self.dispatcher_environment = shared | {
            "JOB_QUEUE": "gpu-queue",
            "JOB_DEFINITION": "embed",
            "SHARD_SIZE": "1000",
            "EMBED_LANE": "auto",
            "LAMBDA_LANE_MAX_IMAGES": str(MAX_IMAGES),
            "EMBED_QUEUE_URL": self.embed_url,
            "LAMBDA_LANE_CONCURRENCY": "2",
            "LANE_FALLBACK_QUEUE_ARN": fallback_arn,
            "POWERTOOLS_SERVICE_NAME": "dispatcher",
        }
        self.worker_environment = {
            "CLIP_MODEL": TINY_MODEL,
            "CLIP_PRETRAINED": str(tiny_checkpoint),
            "CLIP_MODEL_CONFIG": str(tiny_config),
            "DEVICE": "cpu",
            "TRANSIENT_RETRY_SECONDS": "0",
        }
        self.embedder_environment = (
            shared
            | self.worker_environment
            | {
                "DECODE_WORKERS": "1",
                "DECODE_MEMORY_MB": "768",
                "IO_THREADS": "4",
                "BATCH_SIZE": "8",
                "JOB_ATTEMPTS": str(1 + JOB_ATTEMPTS),
                "FALLBACK_QUEUE_URL": self.fallback_url,
                "POWERTOOLS_SERVICE_NAME": "clip-embed",
            }
        )
        for name, value in (self.dispatcher_environment | self.embedder_environment).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "dispatcher")
        self.dispatcher = load_app("lane_dispatcher_app", ROOT / "functions" / "dispatcher" / "app.py")
        monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "clip-embed")
        self.embedder = load_app("lane_embedder_app", ROOT / "functions" / "embedder" / "clip_embedder" / "app.py")
        self.monkeypatch = monkeypatch

    def upload(self, files: dict[str, bytes]) -> dict[str, Any]:
        """The files uploaded, and the SQS event S3's notifications of them make (one message each)."""
        records: list[dict[str, Any]] = []
        for key, data in files.items():
            put = self.s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=data)
            notified = notifications.object_created(
                INPUT_BUCKET, key, len(data), put["ETag"].strip('"'), put["VersionId"], sender="s3"
            )
            records.append(
                sqs_record(json.dumps({"Records": [notified]}), "arn:aws:sqs:us-east-1:123456789012:uploads", len(records))
            )
        return {"Records": records}

    def dispatch(self, event: dict[str, Any]) -> dict[str, Any]:
        return dict(self.dispatcher.lambda_handler(event, Context()))

    def take(self, queue_url: str) -> dict[str, Any]:
        """Every message the queue holds, as Lambda's poller hands them to a function (and deletes them)."""
        records: list[dict[str, Any]] = []
        while messages := self.sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
            for message in messages:
                records.append(
                    sqs_record(
                        message["Body"], f"arn:aws:sqs:us-east-1:123456789012:{queue_url.rsplit('/', 1)[-1]}", len(records)
                    )
                )
                self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        return {"Records": records}

    def embed(self, event: dict[str, Any], context: Context | None = None) -> dict[str, Any]:
        return dict(self.embedder.lambda_handler(event, context or Context()))

    def run_jobs(self) -> list[int]:
        """Every submitted Batch job, run as Batch runs its container (first attempt); their exit codes."""
        codes = []
        for job in self.submitted():
            environment = {
                "OUTPUT_BUCKET": OUTPUT_BUCKET,
                **self.worker_environment,
                "JOB_ATTEMPTS": str(JOB_ATTEMPTS),
                "AWS_BATCH_JOB_ID": job["jobId"],
                "AWS_BATCH_JOB_ATTEMPT": "1",
                **overrides(job),
            }
            codes.append(run(WorkerConfig.from_env(environment), s3=self.s3).exit_code)
        return codes

    def submitted(self) -> list[dict[str, Any]]:
        """Every Batch job submitted to the stack's queue, described."""
        return list(jobs.jobs(self.batch, "gpu-queue", jobs.STATES))


def overrides(job: dict[str, Any]) -> dict[str, str]:
    """The environment a submission gave the job's container."""
    return {item["name"]: item["value"] for item in job["container"].get("environment", [])}


def sqs_record(body: str, source_arn: str, index: int) -> dict[str, Any]:
    return {
        "messageId": f"m-{index}",
        "receiptHandle": f"r-{index}",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1765022400000",
            "SenderId": "EXAMPLE",
            "ApproximateFirstReceiveTimestamp": "1765022400000",
        },
        "messageAttributes": {},
        "md5OfBody": "0" * 32,
        "eventSource": "aws:sqs",
        "eventSourceARN": source_arn,
        "awsRegion": "us-east-1",
    }


@pytest.fixture
def lane(monkeypatch: pytest.MonkeyPatch, tiny_config: Path, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Lane]:
    # The decoding processes load it: poisoned_png() crashes the one that decodes it, as a codec would
    # (SIGSEGV; a SIGKILL is the kernel's out-of-memory killer, which the lane leaves to Batch).
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("SIGKILL", "SIGSEGV"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with mock_aws(config={"batch": {"use_docker": False}}):
        world = Lane(monkeypatch, tiny_config, tiny_checkpoint)
        try:
            yield world
        finally:
            if world.embedder.WARM.sandbox is not None:
                world.embedder.WARM.sandbox.close()


def photos(count: int) -> dict[str, bytes]:
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    return {
        AWKWARD_KEYS[index % len(AWKWARD_KEYS)] + f"-{index}": encode(photo(names[index % len(names)]), "JPEG")
        for index in range(count)
    }


def test_auto_embeds_a_small_batch_on_lambda_with_a_job_childs_outputs(lane: Lane) -> None:
    files = photos(MAX_IMAGES - 1) | {"poison.png": poisoned_png(), "notes.jpg": b"not an image"}
    assert lane.dispatch(lane.upload(files)) == {"batchItemFailures": []}

    # Three accepted (the text file is rejected): one lane request, no Batch job.
    assert lane.submitted() == []
    requests = lane.take(lane.embed_url)
    assert [LaneRequest.model_validate_json(record["body"]).images for record in requests["Records"]] == [MAX_IMAGES]

    assert lane.embed(requests) == {"batchItemFailures": []}
    # Outputs under a job child's keys: the manifest's shard 0.
    manifest_id = LaneRequest.model_validate_json(requests["Records"][0]["body"]).manifest_id
    assert lane.s3.head_object(Bucket=OUTPUT_BUCKET, Key=keys.parquet_key("", lane.model_id, manifest_id, 0))
    vectors, events = stored_vectors(lane.s3, lane.model_id), stored_events(lane.s3, lane.model_id)
    for key, data in photos(MAX_IMAGES - 1).items():
        seen = Image.open(io.BytesIO(data))
        assert cosine(vectors[key], reference_embedding(seen, TINY_MODEL, str(lane.tiny_checkpoint))) >= 0.999, key
        assert events[key]["type"] == "document-created"
        assert events[key]["data"]["jobId"] == f"lambda-{Context.aws_request_id}"
    # The poison killed only the decoding process that held it, and fails alone, as in a job.
    assert events["poison.png"]["data"]["error"]["code"] == "crashes-worker"
    assert lane.take(lane.fallback_url) == {"Records": []}


def test_a_batch_over_the_lanes_size_goes_to_batch(lane: Lane) -> None:
    assert lane.dispatch(lane.upload(photos(MAX_IMAGES + 1))) == {"batchItemFailures": []}
    assert lane.take(lane.embed_url) == {"Records": []}
    (job,) = lane.submitted()
    assert lane.run_jobs() == [EXIT_OK]
    assert len(stored_vectors(lane.s3, lane.model_id)) == MAX_IMAGES + 1


def test_what_the_lane_cannot_afford_goes_to_batch_which_resumes_the_lanes_work(lane: Lane) -> None:
    # Decoded and made RGB it needs over 100 MB: more than this lane's budget, far less than the worker's.
    lane.monkeypatch.setenv("DECODE_MEMORY_MB", "64")
    big = encode(Image.new("L", (6_000, 6_000), 128), "PNG")
    files = photos(2) | {"big.png": big}
    lane.dispatch(lane.upload(files))
    requests = lane.take(lane.embed_url)

    assert lane.embed(requests) == {"batchItemFailures": []}
    # The photos are done; the big PNG has no outcome yet, and the request is handed back.
    assert set(stored_vectors(lane.s3, lane.model_id)) == set(photos(2))
    assert "big.png" not in stored_events(lane.s3, lane.model_id)
    handed = lane.take(lane.fallback_url)
    assert [record["body"] for record in handed["Records"]] == [record["body"] for record in requests["Records"]]

    # The dispatcher reads the fallback queue: a Batch job of the same manifest, counting the lane's attempt.
    assert lane.dispatch(handed) == {"batchItemFailures": []}
    (job,) = lane.submitted()
    given = overrides(job)
    manifest_uri = LaneRequest.model_validate_json(requests["Records"][0]["body"]).manifest_uri
    assert (given["MANIFEST_URI"], given["EARLIER_ATTEMPTS"]) == (manifest_uri, "1")
    assert lane.run_jobs() == [EXIT_OK]
    events = stored_events(lane.s3, lane.model_id)
    assert set(stored_vectors(lane.s3, lane.model_id)) == {*photos(2), "big.png"}
    # The photos were embedded once, by the lane; the job resumed them instead of embedding them again.
    assert {key: event["data"]["jobId"] for key, event in events.items()} == {
        **{key: f"lambda-{Context.aws_request_id}" for key in photos(2)},
        "big.png": job["jobId"],
    }


def test_what_no_machine_may_afford_fails_in_the_lane_as_in_a_job(lane: Lane) -> None:
    # Refused for its structure (5,000 APP1 segments), not for this machine's memory: Batch would refuse
    # it the same way, so the lane fails it alone instead of booting a GPU to say so.
    lane.dispatch(lane.upload(photos(1) | {"flood.jpg": hostile.app_flood()}))
    assert lane.embed(lane.take(lane.embed_url)) == {"batchItemFailures": []}
    assert stored_events(lane.s3, lane.model_id)["flood.jpg"]["data"]["error"]["code"] == "too-costly"
    assert lane.take(lane.fallback_url) == {"Records": []}


def test_auto_sends_a_batch_to_batch_while_the_lane_is_full(lane: Lane) -> None:
    # As many requests wait as the lane runs at once (LAMBDA_LANE_CONCURRENCY): another would only queue.
    for _ in range(2):
        lane.sqs.send_message(
            QueueUrl=lane.embed_url, MessageBody=LaneRequest(manifest_uri="s3://b/m/", manifest_id="m", images=1).to_json()
        )
    lane.dispatch(lane.upload(photos(1)))
    assert len(lane.submitted()) == 1
    assert len(lane.take(lane.embed_url)["Records"]) == 2


def test_requests_sqs_will_not_take_go_to_batch_and_nothing_is_sent_twice(lane: Lane) -> None:
    refused = {"count": 0}
    original = lane.dispatcher.sqs.send_message_batch

    def send_message_batch(**request: Any) -> dict[str, Any]:
        # SQS takes every entry but the first of each call, twice over.
        refused["count"] += 1
        entries = request["Entries"]
        response = original(QueueUrl=request["QueueUrl"], Entries=entries[1:]) if len(entries) > 1 else {}
        return {**response, "Failed": [{"Id": entries[0]["Id"], "SenderFault": False, "Code": "InternalError"}]}

    lane.monkeypatch.setattr(lane.dispatcher.sqs, "send_message_batch", send_message_batch)
    # EmbedLane lambda: every batch to the lane, in requests of at most LambdaLaneMaxImages.
    lane.monkeypatch.setattr(
        lane.dispatcher, "SETTINGS", lane.dispatcher.SETTINGS.model_copy(update={"embed_lane": EmbedLane.LAMBDA})
    )
    assert lane.dispatch(lane.upload(photos(2 * MAX_IMAGES))) == {"batchItemFailures": []}
    sent = [LaneRequest.model_validate_json(record["body"]) for record in lane.take(lane.embed_url)["Records"]]
    (job,) = lane.submitted()
    handed = overrides(job)["MANIFEST_URI"]
    # Two requests of three: one sent, the other (refused twice) handed to Batch, never tried on the lane.
    assert len(sent) == 1 and handed != sent[0].manifest_uri
    assert "EARLIER_ATTEMPTS" not in overrides(job)


def test_lane_requests_left_in_its_queue_after_the_lane_is_turned_off_go_to_batch_untried(lane: Lane) -> None:
    lane.dispatch(lane.upload(photos(2)))
    waiting = lane.take(lane.embed_url)
    # EmbedLane batch: the dispatcher reads the lane's queue (DispatcherLaneLeftovers).
    assert lane.dispatch(waiting) == {"batchItemFailures": []}
    (job,) = lane.submitted()
    assert "EARLIER_ATTEMPTS" not in overrides(job)
    assert lane.run_jobs() == [EXIT_OK]
    assert set(stored_vectors(lane.s3, lane.model_id)) == set(photos(2))


def test_a_lane_invocation_that_fails_leaves_its_request_for_the_fallback_queue(lane: Lane) -> None:
    lane.dispatch(lane.upload(photos(2)))
    requests = lane.take(lane.embed_url)
    lane.s3.delete_object(
        Bucket=OUTPUT_BUCKET,
        Key=keys.manifest_prefix("", LaneRequest.model_validate_json(requests["Records"][0]["body"]).manifest_id)
        + keys.manifest_shard_name(0),
    )

    # Its manifest is gone: the invocation fails (Powertools raises when every record of a batch failed),
    # so Lambda's poller leaves the message in the queue, and SQS moves it to the fallback queue after its
    # one receive (EmbedQueue's maxReceiveCount 1), where the dispatcher hands it to Batch.
    with pytest.raises(BatchProcessingError, match="cannot read the manifest"):
        lane.embed(requests)
    message = requests["Records"][0]["body"]
    lane.sqs.send_message(QueueUrl=lane.embed_url, MessageBody=message)
    (received,) = lane.sqs.receive_message(QueueUrl=lane.embed_url, VisibilityTimeout=0)["Messages"]
    assert lane.sqs.receive_message(QueueUrl=lane.embed_url).get("Messages", []) == []
    assert [record["body"] for record in lane.take(lane.fallback_url)["Records"]] == [message]


def test_the_sample_lane_request_is_what_the_dispatcher_sends() -> None:
    event = json.loads((EVENTS / "sqs-lane-request.json").read_text())
    (record,) = event["Records"]
    request = LaneRequest.model_validate_json(record["body"])
    assert request.manifest_uri.startswith("s3://") and request.images >= 1
