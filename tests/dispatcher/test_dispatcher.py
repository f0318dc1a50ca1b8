"""The dispatcher handler, driven with events/*.json against moto, with real image bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
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
    refusing_get_object,
    submitted_jobs,
)

from clip_shared import keys
from clip_shared.events import from_json
from clip_shared.manifest import Manifest, ManifestEntry
from tests.support import AWKWARD_KEYS

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


def manifests_of(job: dict[str, Any]) -> list[Manifest]:
    """The job's manifest files, one per array child, as each child reads its own."""
    bucket, prefix = keys.parse_s3_url(environment_of(job)["MANIFEST_URI"])
    assert bucket == OUTPUT_BUCKET and prefix.endswith("/")
    size = (job.get("arrayProperties") or {}).get("size") or 1
    manifests = [Manifest.from_json(read_output(prefix + keys.manifest_shard_name(index))) for index in range(size)]
    assert [manifest.shard_index for manifest in manifests] == list(range(size))
    assert output_keys(prefix) == [prefix + keys.manifest_shard_name(index) for index in range(size)]
    return manifests


def entries_of(job: dict[str, Any]) -> list[ManifestEntry]:
    return [entry for manifest in manifests_of(job) for entry in manifest.entries]


def rejection(key: str) -> dict[str, Any]:
    event = from_json(read_output(keys.rejection_key(OUTPUT_PREFIX, INPUT_BUCKET, key)))
    assert event.get_type() == "document-rejected"
    assert event.get_subject() == f"s3://{INPUT_BUCKET}/{key}"
    data = event.get_data()
    assert isinstance(data, dict)
    return data


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
    assert [len(manifest.entries) for manifest in manifests_of(job)] == [SHARD_SIZE, 4 - SHARD_SIZE]
    entries = entries_of(job)
    assert {entry.key: entry.mime_type for entry in entries} == {key: mime for key, (_, _, mime) in BATCH.items()}
    s3 = boto3.client("s3")
    for entry in entries:
        head = s3.head_object(Bucket=INPUT_BUCKET, Key=entry.key)
        assert (entry.bucket, entry.size, entry.version_id) == (INPUT_BUCKET, head["ContentLength"], head["VersionId"])
    assert output_keys(f"{OUTPUT_PREFIX}/rejected/") == []


def test_a_key_with_spaces_and_non_ascii_characters_is_decoded(invoke: Invoke) -> None:
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")

    assert invoke(load_event("sqs-s3-put-unicode-key.json")) == {"batchItemFailures": []}

    job = only_job()
    assert "arrayProperties" not in job or not job["arrayProperties"].get("size")
    assert [entry.key for entry in entries_of(job)] == [UNICODE_KEY]


def test_keys_with_url_characters_reach_the_manifest_byte_for_byte(invoke: Invoke) -> None:
    """Each awkward key as S3 URL-encodes it in the notification; a rejected one is recorded under its own key."""
    event = load_event("sqs-s3-put-unicode-key.json")
    records = []
    for n, key in enumerate(AWKWARD_KEYS):
        put_input(key, encode("chelsea", "JPEG") if n else b"%PDF-1.4 not an image", "image/jpeg")
        body = json.loads(event["Records"][0]["body"])
        body["Records"][0]["s3"]["object"].update(key=quote_plus(key), size=0, eTag="0")
        records.append({**event["Records"][0], "messageId": f"m-{n}", "body": json.dumps(body)})

    assert invoke({"Records": records}) == {"batchItemFailures": []}

    assert sorted(entry.key for entry in entries_of(only_job())) == sorted(AWKWARD_KEYS[1:])
    assert output_keys(f"{OUTPUT_PREFIX}/rejected/") == [keys.rejection_key(OUTPUT_PREFIX, INPUT_BUCKET, AWKWARD_KEYS[0])]


def test_a_non_image_is_rejected_whatever_its_name_and_content_type(invoke: Invoke, capsys: pytest.CaptureFixture[str]) -> None:
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

    entries = entries_of(only_job())
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


def test_a_message_delivered_twice_in_one_batch_is_embedded_once(invoke: Invoke) -> None:
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")
    event = load_event("sqs-s3-put-unicode-key.json")
    twice = {"Records": [event["Records"][0], {**event["Records"][0], "messageId": "redelivered"}]}

    assert invoke(twice) == {"batchItemFailures": []}

    assert [entry.key for entry in entries_of(only_job())] == [UNICODE_KEY]


def test_admission_costs_one_ranged_get_per_object_and_a_job_a_put_per_child(app: ModuleType, invoke: Invoke) -> None:
    upload_batch()
    calls: list[tuple[str, str]] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, params.get("Key", "")))

    app.s3.meta.events.register("before-parameter-build.s3", record)
    try:
        assert invoke(load_event("sqs-s3-put-batch.json")) == {"batchItemFailures": []}
    finally:
        app.s3.meta.events.unregister("before-parameter-build.s3", record)

    # No HEAD, no claim, no record: a GET of each object's first bytes, then the job's two manifest files.
    assert sorted(name for name, key in calls if not key.startswith(OUTPUT_PREFIX)) == ["GetObject"] * len(BATCH)
    writes = sorted(key.removeprefix(f"{OUTPUT_PREFIX}/").split("/", 1)[0] for name, key in calls if name == "PutObject")
    assert writes == ["manifests", "manifests"]


def test_a_delivery_in_another_batch_is_submitted_again(invoke: Invoke) -> None:
    # SQS delivers at least once; without a per-object claim a redelivery is embedded again, and
    # readers of the outputs keep one row per object (docs/scale.md).
    put_input(UNICODE_KEY, encode("chelsea", "JPEG"), "image/jpeg")
    event = load_event("sqs-s3-put-unicode-key.json")

    assert invoke(event) == {"batchItemFailures": []}
    assert invoke(event) == {"batchItemFailures": []}

    assert [[entry.key for entry in entries_of(job)] for job in submitted_jobs()] == [[UNICODE_KEY], [UNICODE_KEY]]


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

    with failing_submit_job(app.batch_client, 429, "TooManyRequestsException", times=1) as attempts:
        assert invoke(load_event("sqs-s3-put-unicode-key.json")) == {"batchItemFailures": []}

    assert len(attempts) == 2
    assert [entry.key for entry in entries_of(only_job())] == [UNICODE_KEY]


def test_a_persistent_failure_is_reported_and_the_redelivery_dispatches(app: ModuleType, invoke: Invoke) -> None:
    upload_mixed()
    event = load_event("sqs-s3-put-mixed.json")

    with failing_submit_job(app.batch_client, 403, "AccessDeniedException"):
        response = invoke(event)

    # Only the two accepted images failed; the rejected objects' messages are done.
    assert response == {"batchItemFailures": message_ids(event, 0, 1)}
    assert submitted_jobs() == []
    assert rejection("mixed/huge.png")["error"]["code"] == "object-too-large"

    # SQS redelivers the failed messages, and this time they are submitted.
    redelivery = {"Records": [event["Records"][0], event["Records"][1]]}
    assert invoke(redelivery) == {"batchItemFailures": []}
    assert {entry.key for entry in entries_of(only_job())} == {"mixed/page.gif", "mixed/motorcycle.tiff"}


def test_when_every_message_fails_the_whole_batch_fails(app: ModuleType, invoke: Invoke) -> None:
    upload_batch()

    with failing_submit_job(app.batch_client, 403, "AccessDeniedException"), pytest.raises(BatchProcessingError):
        invoke(load_event("sqs-s3-put-batch.json"))

    assert submitted_jobs() == []


#: events/sqs-s3-put-unservable.json: objects S3 holds but will not serve the dispatcher's role.
REFUSED = {
    "encrypted/customer-key.jpg": (
        400,
        "InvalidRequest",
        "The object was stored using a form of Server Side Encryption. "
        "The correct parameters must be provided to retrieve the object.",
    ),
    "encrypted/kms-key.jpg": (
        403,
        "AccessDenied",
        "User: arn:aws:sts::123456789012:assumed-role/dispatcher/fn is not authorized to perform: kms:Decrypt "
        "on resource: arn:aws:kms:us-east-1:123456789012:key/1234abcd because no identity-based policy allows it",
    ),
    "encrypted/no-access.jpg": (403, "AccessDenied", "Access Denied"),
}


def test_objects_s3_will_not_serve_are_rejected_each_with_its_own_code(app: ModuleType, invoke: Invoke) -> None:
    s3 = boto3.client("s3")
    for key in ("archive/glacier.jpg", "archive/deep-archive.jpg", "archive/restored.jpg", *REFUSED):
        storage = "DEEP_ARCHIVE" if "deep" in key else "GLACIER" if key.startswith("archive/") else "STANDARD"
        s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=encode("chelsea", "JPEG"), StorageClass=storage)
    s3.restore_object(Bucket=INPUT_BUCKET, Key="archive/restored.jpg", RestoreRequest={"Days": 1})
    event = load_event("sqs-s3-put-unservable.json")

    with refusing_get_object(app.s3, REFUSED):
        # Every message is done: none goes back to the queue, so none reaches the dead-letter queue.
        assert invoke(event) == {"batchItemFailures": []}

    codes = {key: rejection(key)["error"]["code"] for key in ("archive/glacier.jpg", "archive/deep-archive.jpg", *REFUSED)}
    assert codes == {
        "archive/glacier.jpg": "object-archived",
        "archive/deep-archive.jpg": "object-archived",
        "encrypted/customer-key.jpg": "customer-key-required",
        "encrypted/kms-key.jpg": "kms-key-unusable",
        "encrypted/no-access.jpg": "access-denied",
    }
    assert "restore" in rejection("archive/glacier.jpg")["error"]["message"]
    # A restored copy is served: it is embedded like any other.
    assert [entry.key for entry in entries_of(only_job())] == ["archive/restored.jpg"]
