"""retry and redrive: the commands that put lost or failed work back, against template.yaml in the emulator."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from clip_pipeline import jobs
from clip_pipeline.stack import Clients, Stack
from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_shared.manifest import ManifestEntry
from clip_worker.model import load
from clip_worker.writer import OutputWriter
from tests.cli.test_commands import invoke
from tests.support import encode, photo


def upload(deployed: tuple[Clients, Stack], prefix: str, count: int) -> list[ManifestEntry]:
    clients, stack = deployed
    s3, bucket = clients.client("s3"), stack.output("InputBucketName")
    entries = []
    for i in range(count):
        key = f"{prefix}/img-{i}.png"
        data = encode(photo().rotate(i * 11), "PNG")
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        etag = keys.bare_etag(s3.head_object(Bucket=bucket, Key=key)["ETag"])
        entries.append(ManifestEntry(bucket=bucket, key=key, size=len(data), etag=etag, mime_type="image/png"))
    return entries


def record_failure(deployed: tuple[Clients, Stack], entry: ManifestEntry, code: ErrorCode) -> None:
    """What a job child writes for an object it could not embed, written by the worker's own writer."""
    clients, stack = deployed
    model = load(stack.model, stack.pretrained, "cpu")
    manifest_id = f"m-{uuid.uuid4().hex[:8]}"
    writer = OutputWriter(
        clients.client("s3"), stack.output("OutputBucketName"), stack.output_prefix, model, "job-1", manifest_id, 0
    )
    writer.failed(entry, DocumentError(code, f"{entry.url}: it went wrong"))
    writer.checkpoint((entry,))


def submitted_keys(deployed: tuple[Clients, Stack]) -> list[list[str]]:
    """The object keys of every job the queue got, in submission order."""
    clients, stack = deployed
    s3 = clients.client("s3")
    found = jobs.jobs(clients.client("batch"), stack.output("JobQueueArn"), ["SUCCEEDED", "FAILED"])
    return [
        sorted(entry.key for entry in jobs.manifest_entries(s3, job)) for job in sorted(found, key=lambda job: job["createdAt"])
    ]


def test_retry_resubmits_each_failure_once_by_code_and_dry_run_changes_nothing(deployed: tuple[Clients, Stack]) -> None:
    entries = upload(deployed, "retry", 3)
    record_failure(deployed, entries[0], ErrorCode.DOWNLOAD_FAILED)
    record_failure(deployed, entries[1], ErrorCode.CORRUPT_IMAGE)
    # Decoding the same bytes would cost the same: retried only when asked for by its code.
    record_failure(deployed, entries[2], ErrorCode.TOO_COSTLY)
    jobs_before = len(submitted_keys(deployed))

    dry = invoke(deployed, "retry", "--code", "download-failed", "--dry-run")
    assert (dry["dry_run"], dry["candidates"], dry["submitted"], dry["jobs"]) == (True, 1, 1, 0)
    assert len(submitted_keys(deployed)) == jobs_before

    first = invoke(deployed, "retry", "--code", "download-failed")
    assert (first["candidates"], first["submitted"], first["jobs"]) == (1, 1, 1)
    assert submitted_keys(deployed)[-1] == ["retry/img-0.png"]

    everything = invoke(deployed, "retry")
    assert (everything["candidates"], everything["already_retried"], everything["submitted"]) == (2, 1, 1)
    assert submitted_keys(deployed)[-1] == ["retry/img-1.png"]

    again = invoke(deployed, "retry")
    assert (again["already_retried"], again["submitted"], again["jobs"]) == (2, 0, 0)

    costly = invoke(deployed, "retry", "--code", "too-costly")
    assert (costly["candidates"], costly["submitted"]) == (1, 1)
    assert submitted_keys(deployed)[-1] == ["retry/img-2.png"]

    # The retried job failed the object again: that new failure may be retried in its turn.
    record_failure(deployed, entries[0], ErrorCode.DOWNLOAD_FAILED)
    later = invoke(deployed, "retry")
    assert (later["already_retried"], later["submitted"]) == (1, 1)
    assert submitted_keys(deployed)[-1] == ["retry/img-0.png"]


def test_retry_of_failed_jobs_resubmits_the_objects_that_never_got_an_outcome(
    deployed: tuple[Clients, Stack], monkeypatch: pytest.MonkeyPatch
) -> None:
    clients, stack = deployed
    upload(deployed, "stuck", 2)
    # The emulator's Batch fails every job submitted meanwhile, as a job cancelled in RUNNABLE ends.
    monkeypatch.setenv("MOTO_SIMPLE_BATCH_FAIL_AFTER", "0")
    assert invoke(deployed, "backfill", f"s3://{stack.output('InputBucketName')}/stuck/")["submitted"] == 2
    monkeypatch.delenv("MOTO_SIMPLE_BATCH_FAIL_AFTER")

    without = invoke(deployed, "retry", "--code", "no-such-code")
    assert without["candidates"] == 0
    found = invoke(deployed, "retry", "--code", "no-such-code", "--failed-jobs")
    assert (found["candidates"], found["submitted"], found["jobs"]) == (2, 2, 1)
    assert submitted_keys(deployed)[-1] == ["stuck/img-0.png", "stuck/img-1.png"]
    again = invoke(deployed, "retry", "--code", "no-such-code", "--failed-jobs")
    assert (again["already_retried"], again["submitted"]) == (2, 0)


def queue_messages(sqs: Any, url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def test_redrive_moves_the_dead_letter_queue_back_once(deployed: tuple[Clients, Stack]) -> None:
    clients, stack = deployed
    sqs, functions = clients.client("sqs"), clients.client("lambda")
    dead_letters, uploads = stack.output("DeadLetterQueueUrl"), stack.output("UploadQueueUrl")
    # moto's stand-in for Lambda would consume the upload queue; here the test reads it instead.
    for mapping in functions.list_event_source_mappings(FunctionName=stack.output("DispatcherFunctionName"))[
        "EventSourceMappings"
    ]:
        functions.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)
    sqs.purge_queue(QueueUrl=uploads)
    bodies = [json.dumps({"Records": [{"s3": {"object": {"key": f"lost-{i}.jpg"}}}]}) for i in range(13)]
    for body in bodies:
        sqs.send_message(QueueUrl=dead_letters, MessageBody=body)

    dry = invoke(deployed, "redrive", "--dry-run")
    assert (dry["waiting"], dry["moved"]) == (13, 0)
    assert queue_messages(sqs, dead_letters) == 13

    moved = invoke(deployed, "redrive")
    assert moved["moved"] == 13
    assert queue_messages(sqs, dead_letters) == 0
    received = []
    while messages := sqs.receive_message(QueueUrl=uploads, MaxNumberOfMessages=10).get("Messages", []):
        received += [message["Body"] for message in messages]
    assert sorted(received) == sorted(bodies)

    assert invoke(deployed, "redrive")["moved"] == 0


def test_redrive_of_the_indexer_moves_its_own_dead_letter_queue(deployed: tuple[Clients, Stack]) -> None:
    clients, stack = deployed
    sqs, functions = clients.client("sqs"), clients.client("lambda")
    for mapping in functions.list_event_source_mappings(FunctionName=stack.output("IndexerFunctionName"))["EventSourceMappings"]:
        functions.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)
    sqs.send_message(QueueUrl=stack.output("IndexerDeadLetterQueueUrl"), MessageBody='{"Records": []}')
    uploads_before = queue_messages(sqs, stack.output("UploadQueueUrl"))

    moved = invoke(deployed, "redrive", "--indexer")

    assert (moved["queue"], moved["moved"]) == ("indexer", 1)
    assert queue_messages(sqs, stack.output("IndexerQueueUrl")) == 1
    assert queue_messages(sqs, stack.output("UploadQueueUrl")) == uploads_before
