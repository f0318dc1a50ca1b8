"""The dispatcher handler, driven with events/*.json against moto, with real image bytes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from types import ModuleType
from typing import Any, Callable

import boto3
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

from clip_shared import dispatch, keys
from clip_shared.events import from_json
from clip_shared.manifest import Manifest, ManifestEntry
from dispatcher_support import (
    INPUT_BUCKET,
    JOB_DEFINITION,
    JOB_QUEUE,
    MAX_OBJECT_BYTES,
    OUTPUT_BUCKET,
    OUTPUT_PREFIX,
    SHARD_SIZE,
    encode,
    environment_of,
    failing_submit_job,
    load_event,
    noise_png,
    output_keys,
    put_input,
    read_output,
    submitted_jobs,
)

Invoke = Callable[[dict[str, Any]], dict[str, Any]]

BATCH = {  # events/sqs-s3-put-batch.json: key -> (photo, Pillow format, MIME type the dispatcher must detect)
    "photos/chelsea.jpg": ("chelsea", "JPEG", "image/jpeg"),
    "photos/coffee.png": ("coffee", "PNG", "image/png"),
    "photos/astronaut.webp": ("astronaut", "WEBP", "image/webp"),
    "photos/rocket.bmp": ("rocket", "BMP", "image/bmp"),
}
UNICODE_KEY = "holiday photos/Zürich café (1).jpg"
NOT_AN_IMAGE = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n" + b"%" * 400


def upload_batch() -> None:
    for key, (photo, fmt, _) in BATCH.items():
        # A Content-Type the dispatcher must not trust.
        put_input(key, encode(photo, fmt), "application/octet-stream")


def upload_mixed() -> None:
    put_input("mixed/page.gif", encode("page", "GIF"), "image/gif")
    put_input("mixed/motorcycle.tiff", encode("chelsea", "TIFF"), "image/tiff")
    put_input("mixed/huge.png", noise_png(MAX_OBJECT_BYTES + 1), "image/png")
    put_input("mixed/deleted.jpg", encode("coffee", "JPEG"), "image/jpeg")
    boto3.client("s3").delete_object(Bucket=INPUT_BUCKET, Key="mixed/deleted.jpg")


def only_job() -> dict[str, Any]:
    jobs = submitted_jobs()
    assert len(jobs) == 1, f"expected exactly one job, got {[job['jobName'] for job in jobs]}"
    return jobs[0]


def manifest_of(job: dict[str, Any]) -> Manifest:
    bucket, key = keys.parse_s3_url(environment_of(job)["MANIFEST_URI"])
    assert bucket == OUTPUT_BUCKET
    return Manifest.from_json(read_output(key), source=key)


def rejection(key: str) -> dict[str, Any]:
    event = from_json(read_output(keys.rejection_key(OUTPUT_PREFIX, INPUT_BUCKET, key)))
    assert event.get_type() == "document-rejected"
    assert event.get_subject() == f"s3://{INPUT_BUCKET}/{key}"
    return event.get_data()


def message_ids(event: dict[str, Any], *indexes: int) -> list[dict[str, str]]:
    return [{"itemIdentifier": event["Records"][index]["messageId"]} for index in indexes]


def emitted_metrics(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{") and '"_aws"' in line]


def test_a_batch_larger_than_a_shard_becomes_one_array_job(invoke: Invoke) -> None:
    upload_batch()

    assert invoke(load_event("sqs-s3-put-batch.json")) == {"batchItemFailures": []}

    job = only_job()
    assert job["jobQueue"].endswith(f":job-queue/{JOB_QUEUE}")
    assert f":job-definition/{JOB_DEFINITION}:" in job["jobDefinition"]
    assert job["arrayProperties"]["size"] == 2  # 4 images in shards of 3
    manifest = manifest_of(job)
    assert manifest.shard_size == SHARD_SIZE
    assert {entry.key: entry.mime_type for entry in manifest.entries} == {
        key: mime for key, (_, _, mime) in BATCH.items()
    }
    s3 = boto3.client("s3")
    for entry in manifest.entries:
        head = s3.head_object(Bucket=INPUT_BUCKET, Key=entry.key)
        assert (entry.bucket, entry.size, entry.version_id) == (INPUT_BUCKET, head["ContentLength"], head["VersionId"])
    assert output_keys(f"{OUTPUT_PREFIX}/rejected/") == []


def test_a_key_with_spaces_and_non_ascii_characters_is_decoded(invoke: Invoke) -> None:
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")

    assert invoke(load_event("sqs-s3-put-unicode-key.json")) == {"batchItemFailures": []}

    job = only_job()
    assert "arrayProperties" not in job or not job["arrayProperties"].get("size")
    assert [entry.key for entry in manifest_of(job).entries] == [UNICODE_KEY]


def test_a_non_image_is_rejected_whatever_its_name_and_content_type(
    invoke: Invoke, capsys: pytest.CaptureFixture[str]
) -> None:
    put_input("uploads/report.jpg", NOT_AN_IMAGE, "image/jpeg")

    assert invoke(load_event("sqs-s3-put-not-an-image.json")) == {"batchItemFailures": []}

    assert submitted_jobs() == []
    record = rejection("uploads/report.jpg")
    assert record["error"]["code"] == "unsupported-type"
    assert "application/pdf" in record["error"]["message"]
    assert record["document"]["type"] == "application/pdf"
    rejected = [m for m in emitted_metrics(capsys.readouterr().out) if "ObjectsRejected" in m]
    assert [(m["Reason"], m["ObjectsRejected"]) for m in rejected] == [("unsupported-type", [1.0])]


def test_rejected_objects_are_recorded_and_the_rest_dispatched(invoke: Invoke) -> None:
    upload_mixed()

    assert invoke(load_event("sqs-s3-put-mixed.json")) == {"batchItemFailures": []}

    entries = manifest_of(only_job()).entries
    assert {(entry.key, entry.mime_type) for entry in entries} == {
        ("mixed/page.gif", "image/gif"),
        ("mixed/motorcycle.tiff", "image/tiff"),
    }
    assert rejection("mixed/huge.png")["error"]["code"] == "object-too-large"
    assert rejection("mixed/deleted.jpg")["error"]["code"] == "object-not-found"
    assert len(output_keys(f"{OUTPUT_PREFIX}/rejected/")) == 2


def test_the_s3_test_event_is_skipped(invoke: Invoke) -> None:
    assert invoke(load_event("sqs-s3-test-event.json")) == {"batchItemFailures": []}

    assert submitted_jobs() == []
    assert output_keys() == []


def test_a_duplicate_delivery_submits_nothing_new(invoke: Invoke) -> None:
    upload_batch()
    event = load_event("sqs-s3-put-batch.json")

    assert invoke(event) == {"batchItemFailures": []}
    assert invoke(event) == {"batchItemFailures": []}

    only_job()


def test_a_new_version_of_an_object_is_dispatched_again(invoke: Invoke) -> None:
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")
    invoke(load_event("sqs-s3-put-unicode-key.json"))
    put_input(UNICODE_KEY, encode("coffee", "JPEG"), "image/jpeg")

    invoke(load_event("sqs-s3-put-unicode-key.json"))

    assert len(submitted_jobs()) == 2


def test_a_notification_for_a_replaced_version_is_left_to_the_newer_one(invoke: Invoke) -> None:
    s3 = boto3.client("s3")
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")
    old_version = s3.head_object(Bucket=INPUT_BUCKET, Key=UNICODE_KEY)["VersionId"]
    put_input(UNICODE_KEY, encode("coffee", "JPEG"), "image/jpeg")
    event = load_event("sqs-s3-put-unicode-key.json")
    body = json.loads(event["Records"][0]["body"])
    body["Records"][0]["s3"]["object"]["versionId"] = old_version
    event["Records"][0]["body"] = json.dumps(body)

    assert invoke(event) == {"batchItemFailures": []}

    assert submitted_jobs() == []


def test_a_submit_job_throttle_is_retried(app: ModuleType, invoke: Invoke) -> None:
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")

    with failing_submit_job(app.batch, 429, "TooManyRequestsException", times=1) as attempts:
        assert invoke(load_event("sqs-s3-put-unicode-key.json")) == {"batchItemFailures": []}

    assert len(attempts) == 2
    assert [entry.key for entry in manifest_of(only_job()).entries] == [UNICODE_KEY]


def test_a_persistent_failure_is_reported_and_the_redelivery_dispatches(app: ModuleType, invoke: Invoke) -> None:
    upload_mixed()
    event = load_event("sqs-s3-put-mixed.json")

    with failing_submit_job(app.batch, 403, "AccessDeniedException"):
        response = invoke(event)

    # Only the two accepted images failed; the rejected objects' messages are done.
    assert response == {"batchItemFailures": message_ids(event, 0, 1)}
    assert submitted_jobs() == []
    assert rejection("mixed/huge.png")["error"]["code"] == "object-too-large"

    # SQS redelivers the failed messages; their objects were not left claimed.
    redelivery = {"Records": [event["Records"][0], event["Records"][1]]}
    assert invoke(redelivery) == {"batchItemFailures": []}
    assert {entry.key for entry in manifest_of(only_job()).entries} == {"mixed/page.gif", "mixed/motorcycle.tiff"}


def test_when_every_message_fails_the_whole_batch_fails(app: ModuleType, invoke: Invoke) -> None:
    upload_batch()

    with failing_submit_job(app.batch, 403, "AccessDeniedException"), pytest.raises(BatchProcessingError):
        invoke(load_event("sqs-s3-put-batch.json"))

    assert submitted_jobs() == []


def _claim_unicode_object(age: timedelta) -> dispatch.Claim:
    s3 = boto3.client("s3")
    head = s3.head_object(Bucket=INPUT_BUCKET, Key=UNICODE_KEY)
    entry = ManifestEntry(bucket=INPUT_BUCKET, key=UNICODE_KEY, size=head["ContentLength"],
                          etag=head["ETag"].strip('"'), mime_type="image/jpeg", version_id=head["VersionId"])
    return dispatch.claim(s3, OUTPUT_BUCKET, OUTPUT_PREFIX, entry, "an-invocation-that-died",
                          datetime.now(timezone.utc) - age, claim_ttl=timedelta(minutes=10))


def test_an_object_being_dispatched_elsewhere_is_retried_later(invoke: Invoke) -> None:
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")
    assert _claim_unicode_object(age=timedelta(seconds=5)) is dispatch.Claim.CLAIMED
    event = load_event("sqs-s3-put-unicode-key.json")

    with pytest.raises(BatchProcessingError):  # its only message failed, so SQS redelivers it
        invoke(event)

    assert submitted_jobs() == []


def test_a_claim_left_by_an_invocation_that_died_is_taken_over(invoke: Invoke) -> None:
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")
    assert _claim_unicode_object(age=timedelta(hours=1)) is dispatch.Claim.CLAIMED

    assert invoke(load_event("sqs-s3-put-unicode-key.json")) == {"batchItemFailures": []}

    assert [entry.key for entry in manifest_of(only_job()).entries] == [UNICODE_KEY]
