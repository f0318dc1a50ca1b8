"""Reading outcomes back: counted at one HEAD per job child, the failures streamed from the batches that hold any."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from clip_dispatch.admission import ObjectRef, admit, record_rejection
from clip_pipeline import report, retry
from clip_shared import keys
from clip_shared.events import BatchCounts
from clip_worker.config import WorkerConfig
from clip_worker.runner import EXIT_OK, run
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET, encode, photo, put_manifest, tiny_worker_config, upload
from tests.worker.test_runner import model_id


def url(key: str) -> str:
    return f"s3://{INPUT_BUCKET}/{key}"


def images(count: int, broken: tuple[int, ...] = ()) -> dict[str, bytes]:
    """`count` distinct photos; those at the `broken` positions cut to a third, which no decoder reads."""
    files = {}
    for i in range(count):
        data = encode(photo().rotate(i * 7), "JPEG")
        files[f"img-{i:02d}.jpg"] = data[: len(data) // 3] if i in broken else data
    return files


def run_children(s3: Any, config: WorkerConfig, uri: str, children: int, **changes: Any) -> None:
    for child in range(children):
        assert run(replace(config, manifest_uri=uri, array_index=child, **changes), s3=s3).exit_code == EXIT_OK


def reject(s3: Any, key: str, body: bytes) -> None:
    """What the dispatcher does with an upload it refuses."""
    s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=body)
    admission = admit(s3, ObjectRef(INPUT_BUCKET, key), 1 << 30)
    assert admission.rejection is not None
    record_rejection(s3, OUTPUT_BUCKET, "", admission.rejection, "m-dispatch")


def batches(s3: Any, mid: str) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=keys.events_prefix("", mid))["Contents"]]


def test_status_counts_each_outcome_once_per_child_however_often_the_child_ran(
    s3: Any, tiny_config: Path, tiny_checkpoint: Path
) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    uri = put_manifest(s3, upload(s3, images(9, broken=(1, 7))), shard_size=4)
    run_children(s3, config, uri, 3)
    # Batch ran every child again (a Spot reclaim, a retry): each resumes and rewrites its outputs.
    run_children(s3, config, uri, 3, attempt=2)
    reject(s3, "notes.jpg", b"milk, eggs")
    mid = model_id(config)

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", mid)

    assert (outcomes.embedded, dict(outcomes.failed), outcomes.rejected) == (7, {"corrupt-image": 2}, 1)
    assert set(outcomes.failed_examples) == {url("img-01.jpg"), url("img-07.jpg")}
    assert {failure.code for failure in outcomes.failed_examples.values()} == {"corrupt-image"}
    assert list(outcomes.rejected_examples) == [url("notes.jpg")]
    assert outcomes.rejected_examples[url("notes.jpg")].code == "unsupported-type"
    assert outcomes.recorded == 10
    shown = outcomes.as_dict()
    assert (shown["embedded"], shown["failed"]["count"], shown["failed"]["codes"], shown["rejected"]["count"]) == (
        7,
        2,
        {"corrupt-image": 2},
        1,
    )
    # Each batch's counts are its events'.
    for key in batches(s3, mid):
        events = json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())
        assert BatchCounts.from_metadata(s3.head_object(Bucket=OUTPUT_BUCKET, Key=key)["Metadata"]) == BatchCounts.of(events)


def test_a_batch_written_before_the_counts_existed_is_counted_from_its_events(
    s3: Any, tiny_config: Path, tiny_checkpoint: Path
) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    uri = put_manifest(s3, upload(s3, images(6, broken=(4,))), shard_size=3)
    run_children(s3, config, uri, 2)
    mid = model_id(config)
    old = batches(s3, mid)[1]
    s3.copy_object(Bucket=OUTPUT_BUCKET, Key=old, CopySource={"Bucket": OUTPUT_BUCKET, "Key": old}, MetadataDirective="REPLACE")
    assert keys.EVENTS_OUTCOMES_METADATA not in s3.head_object(Bucket=OUTPUT_BUCKET, Key=old)["Metadata"]

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", mid)

    assert (outcomes.embedded, dict(outcomes.failed)) == (5, {"corrupt-image": 1})
    assert list(retry.latest_failures(s3, OUTPUT_BUCKET, "", mid)) == [url("img-04.jpg")]


def test_an_object_delivered_twice_counts_in_each_job_and_is_found_embedded_once(
    s3: Any, tiny_config: Path, tiny_checkpoint: Path
) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    entries = upload(s3, {"cat.png": encode(photo(), "PNG"), "rocket.png": encode(photo("rocket.jpg"), "PNG")})
    # The second delivery of cat.png's notification went into a job of its own.
    for manifest_id, job in (("m-1", entries), ("m-2", entries[:1])):
        uri = put_manifest(s3, job, manifest_id=manifest_id)
        assert run(replace(config, manifest_uri=uri), s3=s3).exit_code == EXIT_OK
    mid = model_id(config)

    assert report.tally(s3, OUTPUT_BUCKET, "", mid).embedded == 3
    assert len(report.embedded_etags(s3, OUTPUT_BUCKET, "", mid)) == 2


def recorded_calls(s3: Any) -> list[str]:
    calls: list[str] = []
    s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    return calls


def test_counting_costs_a_head_per_child_whatever_the_images_and_the_failures_a_get_per_child_holding_any(
    s3: Any, tiny_config: Path, tiny_checkpoint: Path
) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    # Three children of six images; only the last holds failures.
    uri = put_manifest(s3, upload(s3, images(18, broken=(13, 16))), shard_size=6)
    run_children(s3, config, uri, 3)
    for n in range(3):
        reject(s3, f"notes-{n}.jpg", b"not an image")
    mid = model_id(config)
    calls = recorded_calls(s3)

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", mid)

    assert (outcomes.embedded, outcomes.failed.total(), outcomes.rejected) == (16, 2, 3)
    # A LIST of the batches and one of the rejections; a HEAD per child; the failures shown from the
    # one batch that holds any; each rejection shown (there are fewer than report.EXAMPLES).
    assert sorted(calls) == sorted(["ListObjectsV2"] * 2 + ["HeadObject"] * 3 + ["GetObject"] * (1 + 3))

    calls.clear()
    failed = retry.latest_failures(s3, OUTPUT_BUCKET, "", mid)

    assert set(failed) == {url("img-13.jpg"), url("img-16.jpg")}
    assert sorted(calls) == ["GetObject", "HeadObject", "HeadObject", "HeadObject", "ListObjectsV2"]


def test_status_shows_a_few_failures_by_url_and_counts_them_all(s3: Any, tiny_config: Path, tiny_checkpoint: Path) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    count = report.EXAMPLES + 5
    uri = put_manifest(s3, upload(s3, images(count, broken=tuple(range(count)))), shard_size=10)
    run_children(s3, config, uri, 3)
    calls = recorded_calls(s3)

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", model_id(config))

    assert (outcomes.embedded, dict(outcomes.failed), len(outcomes.failed_examples)) == (0, {"corrupt-image": count}, 20)
    # The examples come from the first batches only: two of the three.
    assert calls.count("GetObject") == 2
    assert len(retry.latest_failures(s3, OUTPUT_BUCKET, "", model_id(config))) == count


def test_retry_takes_each_object_s_latest_failure_and_not_one_embedded_since_as_a_new_version(
    s3: Any, tiny_config: Path, tiny_checkpoint: Path
) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    good, broken = encode(photo(), "JPEG"), encode(photo("rocket.jpg"), "JPEG")
    first = upload(s3, {"a.jpg": broken[:100], "b.jpg": broken[:200], "c.jpg": good})
    run(replace(config, manifest_uri=put_manifest(s3, first, manifest_id="m-1")), s3=s3)
    # a.jpg fails again in a later job (a duplicate delivery); b.jpg is replaced by a good version.
    second = upload(s3, {"b.jpg": good})
    run(replace(config, manifest_uri=put_manifest(s3, [first[0], *second], manifest_id="m-2")), s3=s3)
    mid = model_id(config)

    failed = retry.latest_failures(s3, OUTPUT_BUCKET, "", mid)

    assert sorted(failed) == [url("a.jpg"), url("b.jpg")]
    events = {
        event["data"]["document"]["url"]: event
        for key in batches(s3, mid)
        if "/m-2/" in key
        for event in json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())
    }
    # a.jpg's failure is its second one; b.jpg's is the old version's, whose ETag differs from today's.
    assert failed[url("a.jpg")].failure_id == events[url("a.jpg")]["id"]
    assert failed[url("b.jpg")].etag == first[1].etag != second[0].etag
