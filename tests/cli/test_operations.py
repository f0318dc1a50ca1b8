"""retry and redrive: the commands that put lost or failed work back, against template.yaml in the emulator."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.awsrequest import AWSResponse

from clip_pipeline import jobs
from clip_pipeline.app import app
from clip_pipeline.stack import Clients, Stack
from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_shared.manifest import ManifestEntry
from clip_worker.model import load
from clip_worker.reader import ObjectVersion
from clip_worker.writer import OutputWriter
from tests.cli.test_commands import invoke, runner
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
    upload(deployed, "stuck", 3)
    # The emulator's Batch fails every job submitted meanwhile, as a job cancelled in RUNNABLE ends.
    monkeypatch.setenv("MOTO_SIMPLE_BATCH_FAIL_AFTER", "0")
    assert invoke(deployed, "backfill", f"s3://{stack.output('InputBucketName')}/stuck/")["submitted"] == 3
    monkeypatch.delenv("MOTO_SIMPLE_BATCH_FAIL_AFTER")
    # An array job of two children (ShardSize 2); the first embedded one image before it failed.
    s3, output = clients.client("s3"), stack.output("OutputBucketName")
    (job,) = jobs.jobs(clients.client("batch"), stack.output("JobQueueArn"), ["FAILED"])
    assert jobs.failed_children(clients.client("batch"), job) == [0, 1]
    manifest = jobs.child_manifest(s3, job, 0)
    assert manifest is not None
    model = load(stack.model, stack.pretrained, "cpu")
    writer = OutputWriter(s3, output, stack.output_prefix, model, job["jobId"], manifest.manifest_id, 0)
    done = manifest.entries[0]
    writer.created(done, ObjectVersion(done.etag), np.full(model.dimensions, model.dimensions**-0.5, np.float32))
    writer.checkpoint(manifest.entries)

    without = invoke(deployed, "retry", "--code", "no-such-code")
    assert without["candidates"] == 0
    found = invoke(deployed, "retry", "--code", "no-such-code", "--failed-jobs")
    assert (found["candidates"], found["submitted"], found["jobs"]) == (2, 2, 1)
    left = sorted({"stuck/img-0.png", "stuck/img-1.png", "stuck/img-2.png"} - {done.key})
    assert submitted_keys(deployed)[-1] == left
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


def test_retry_resubmits_the_failed_object_not_the_key_a_url_parser_would_make_of_it(deployed: tuple[Clients, Stack]) -> None:
    clients, stack = deployed
    s3, bucket = clients.client("s3"), stack.output("InputBucketName")
    entries = []
    for n, key in enumerate(("odd/IMG #12.png", "odd/IMG ", "odd/what?size=1.png", "odd/what")):
        data = encode(photo().rotate(n * 13), "PNG")
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        etag = keys.bare_etag(s3.head_object(Bucket=bucket, Key=key)["ETag"])
        entries.append(ManifestEntry(bucket=bucket, key=key, size=len(data), etag=etag, mime_type="image/png"))
    record_failure(deployed, entries[0], ErrorCode.DOWNLOAD_FAILED)
    record_failure(deployed, entries[2], ErrorCode.DOWNLOAD_FAILED)

    done = invoke(deployed, "retry", "--code", "download-failed")

    assert done["submitted"] >= 2
    assert {"odd/IMG #12.png", "odd/what?size=1.png"} <= set(submitted_keys(deployed)[-1])
    assert not {"odd/IMG ", "odd/what"} & set(submitted_keys(deployed)[-1])


def test_retry_leaves_an_object_replaced_since_it_failed_to_its_new_version(deployed: tuple[Clients, Stack]) -> None:
    clients, stack = deployed
    (entry,) = upload(deployed, "replaced", 1)
    record_failure(deployed, entry, ErrorCode.INTERNAL_ERROR)
    # Uploaded again: the new version's own notification takes it to a job.
    clients.client("s3").put_object(Bucket=entry.bucket, Key=entry.key, Body=encode(photo("rocket.jpg"), "PNG"))
    jobs_before = len(submitted_keys(deployed))

    done = invoke(deployed, "retry", "--code", "internal-error")

    assert (done["candidates"], done["superseded"], done["submitted"], done["jobs"]) == (1, 1, 0, 0)
    assert len(submitted_keys(deployed)) == jobs_before
    assert invoke(deployed, "retry", "--code", "internal-error")["already_retried"] == 1


def test_status_shows_the_jobs_waiting_for_an_instance_why_and_the_command_that_cancels_them(
    deployed: tuple[Clients, Stack],
) -> None:
    clients, stack = deployed
    queue = stack.output("JobQueueArn")
    # The emulator runs every job at once, so RUNNABLE is Batch's answer, given here as Batch gives it.
    stuck: list[dict[str, Any]] = [
        {
            "jobId": "0f6b-later",
            "jobName": "clip-m-later",
            "createdAt": 1_765_003_600_000,
            "status": "RUNNABLE",
            "statusReason": "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - Service cannot fulfill the capacity requested for instance type [g4dn.xlarge]",
        },
        {
            "jobId": "0f6b-first",
            "jobName": "clip-m-first",
            "createdAt": 1_765_000_000_000,
            "status": "RUNNABLE",
            "statusReason": "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - The job resource requirement (vCPU/memory/GPU) is higher than that can be met by the CE(s) attached to the job queue.",
        },
        # Two children of an array job wait on their own; their parent stays PENDING.
        *(
            {
                "jobId": f"0f6b-array:{index}",
                "jobName": "clip-m-array",
                "createdAt": 1_765_001_800_000,
                "status": "RUNNABLE",
                "statusReason": "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - Service cannot fulfill the capacity requested",
            }
            for index in (3, 7)
        ),
    ]

    def batch(model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        request = json.loads(params["body"] or b"{}")
        if model.name == "ListJobs" and request.get("jobStatus") == "RUNNABLE":
            return AWSResponse(None, 200, {}, None), {
                "jobSummaryList": [{k: job[k] for k in ("jobId", "jobName", "createdAt", "status")} for job in stuck]
            }
        if model.name == "DescribeJobs" and set(request["jobs"]) <= {job["jobId"] for job in stuck}:
            return AWSResponse(None, 200, {}, None), {
                "jobs": [{**job, "jobQueue": queue} for job in stuck if job["jobId"] in request["jobs"]]
            }
        return None

    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-call.batch", batch)
    try:
        report = invoke(deployed, "status")
        table = runner.invoke(
            app, ["status", "--stack-name", stack.name, "--endpoint-url", clients.endpoint_url or ""], env={"COLUMNS": "400"}
        )
    finally:
        boto3.DEFAULT_SESSION = None

    assert report["jobs"]["RUNNABLE"] == 2
    assert [(job["job_id"], job["since"], job["waiting"], job["reason"].split(" - ")[0]) for job in report["waiting"]] == [
        ("0f6b-first", "2025-12-06T05:46:40+00:00", 1, "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"),
        ("0f6b-array", "2025-12-06T06:16:40+00:00", 2, "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"),
        ("0f6b-later", "2025-12-06T06:46:40+00:00", 1, "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"),
    ]
    # What the command does to what `list-jobs` prints: each job once, an array job by its parent.
    command = report["cancel_waiting_command"]
    assert command.startswith(f"aws batch list-jobs --job-queue {queue} --job-status RUNNABLE")
    listed = "\t".join(job["jobId"] for job in stuck) + "\n"
    pipeline = command.split(" | ", 1)[1].split(" | xargs")[0]
    ids = subprocess.run(["sh", "-c", pipeline], input=listed, capture_output=True, text=True, check=True).stdout.split()
    assert ids == ["0f6b-array", "0f6b-first", "0f6b-later"]
    assert command.endswith("xargs -n 1 aws batch cancel-job --reason 'cancelled by the operator: waiting in RUNNABLE' --job-id")
    assert table.exit_code == 0, table.output
    assert (
        "waiting since 2025-12-06T05:46:40+00:00: clip-m-first (0f6b-first): MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"
        in table.output
    )
    assert "one per RunnableTimeoutSeconds" in table.output and "aws batch cancel-job" in table.output
    # Nothing waits: nothing to cancel.
    assert invoke(deployed, "status")["cancel_waiting_command"] is None


def test_backfill_and_retry_go_past_an_object_s3_will_not_serve(deployed: tuple[Clients, Stack]) -> None:
    # Last in the module: the failure it records is one every later `retry` would count.
    clients, stack = deployed
    s3, bucket = clients.client("s3"), stack.output("InputBucketName")
    upload(deployed, "cold", 2)
    data = encode(photo(), "PNG")
    s3.put_object(Bucket=bucket, Key="cold/archived.png", Body=data, StorageClass="DEEP_ARCHIVE")

    for _ in range(2):  # it was a traceback and exit 1 on every run
        counts = invoke(deployed, "backfill", f"s3://{bucket}/cold/")
        assert (counts["listed"], counts["rejected"]) == (3, 1)
    assert submitted_keys(deployed)[-1] == ["cold/img-0.png", "cold/img-1.png"]
    record = s3.get_object(
        Bucket=stack.output("OutputBucketName"), Key=keys.rejection_key(stack.output_prefix, bucket, "cold/archived.png")
    )
    event = json.loads(record["Body"].read())
    assert (event["type"], event["data"]["error"]["code"]) == ("document-rejected", "object-archived")

    # Archived after a job was submitted, it failed in the worker: retry turns that into its rejection.
    etag = keys.bare_etag(s3.head_object(Bucket=bucket, Key="cold/archived.png")["ETag"])
    entry = ManifestEntry(bucket=bucket, key="cold/archived.png", size=len(data), etag=etag, mime_type="image/png")
    record_failure(deployed, entry, ErrorCode.OBJECT_ARCHIVED)
    retried = invoke(deployed, "retry", "--code", "object-archived")
    assert (retried["candidates"], retried["rejected"], retried["submitted"], retried["jobs"]) == (1, 1, 0, 0)


def test_status_shows_the_uploads_the_dispatcher_has_not_taken(deployed: tuple[Clients, Stack]) -> None:
    clients, stack = deployed
    sqs, queue = clients.client("sqs"), stack.output("UploadQueueUrl")
    # The dispatcher's trigger off, as an operator would to hold uploads back (moto's would consume them).
    functions = clients.client("lambda")
    for mapping in functions.list_event_source_mappings(FunctionName=stack.output("DispatcherFunctionName"))[
        "EventSourceMappings"
    ]:
        functions.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)
    before = invoke(deployed, "status")["upload_queue"]
    for n in range(3):
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": [], "n": n}))
    taken = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=1, VisibilityTimeout=300)["Messages"]
    try:
        after = invoke(deployed, "status")["upload_queue"]
        # The emulator keeps no CloudWatch metrics: the age is unknown, not made up.
        assert after == {"waiting": before["waiting"] + 2, "in_flight": before["in_flight"] + 1, "oldest_s": None}
    finally:
        # Not purge_queue: once a minute at most, and other tests of this stack use it.
        left = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
        for message in [*taken, *left]:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
