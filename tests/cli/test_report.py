"""Reading outcomes back: counted at one HEAD per job child, the failures streamed from the batches that hold any."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from clip_dispatch.admission import ObjectRef, admit, record_rejection
from clip_pipeline import report, retry
from clip_pipeline.app import _outcome_rows
from clip_shared import keys
from clip_shared.events import BatchCounts, DocumentError, ErrorCode
from clip_shared.manifest import ManifestEntry
from clip_worker.config import WorkerConfig
from clip_worker.model import ClipModel, load
from clip_worker.reader import ObjectVersion
from clip_worker.runner import EXIT_OK, run
from clip_worker.writer import OutputWriter
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET, TINY_MODEL, encode, photo, put_manifest, tiny_worker_config, upload
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


def run_children(s3: Any, config: WorkerConfig, uri: str, children: int) -> None:
    for child in range(children):
        assert run(replace(config, manifest_uri=uri, array_index=child), s3=s3).exit_code == EXIT_OK


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
    uri = put_manifest(s3, upload(s3, images(5, broken=(1, 4))), shard_size=3)
    run_children(s3, config, uri, 2)
    # Batch ran a child again (a Spot reclaim, a retry): it resumes and rewrites its outputs.
    assert run(replace(config, manifest_uri=uri, array_index=1, attempt=2), s3=s3).exit_code == EXIT_OK
    reject(s3, "notes.jpg", b"milk, eggs")
    mid = model_id(config)

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", mid)

    assert (outcomes.embedded, dict(outcomes.failed), outcomes.rejected) == (3, {"corrupt-image": 2}, 1)
    assert set(outcomes.failed_examples) == {url("img-01.jpg"), url("img-04.jpg")}
    assert {failure.code for failure in outcomes.failed_examples.values()} == {"corrupt-image"}
    assert list(outcomes.rejected_examples) == [url("notes.jpg")]
    assert outcomes.rejected_examples[url("notes.jpg")].code == "unsupported-type"
    assert outcomes.recorded == 6
    shown = outcomes.as_dict()
    assert (shown["embedded"], shown["failed"]["count"], shown["failed"]["codes"], shown["rejected"]["count"]) == (
        3,
        2,
        {"corrupt-image": 2},
        1,
    )
    # Each batch's counts are its events'.
    for key in batches(s3, mid):
        events = json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())
        assert BatchCounts.from_metadata(s3.head_object(Bucket=OUTPUT_BUCKET, Key=key)["Metadata"]) == BatchCounts.of(events)


@pytest.fixture(scope="module")
def model(tiny_config: Path, tiny_checkpoint: Path) -> ClipModel:
    return load(TINY_MODEL, str(tiny_checkpoint), "cpu", model_config_path=str(tiny_config))


def entry(key: str, etag: str = "e1") -> ManifestEntry:
    return ManifestEntry(bucket=INPUT_BUCKET, key=key, size=1000, etag=etag, mime_type="image/jpeg")


def write_child(
    s3: Any, model: ClipModel, manifest_id: str, index: int, embedded: list[ManifestEntry], failed: list[ManifestEntry]
) -> None:
    """A job child's outputs for these outcomes, written by the worker's own writer (no images decoded)."""
    writer = OutputWriter(s3, OUTPUT_BUCKET, "", model, "job-1", manifest_id, index)
    vector = np.full(model.dimensions, model.dimensions**-0.5, np.float32)
    for item in embedded:
        writer.created(item, ObjectVersion(item.etag, datetime.now(UTC)), vector)
    for item in failed:
        writer.failed(item, DocumentError(ErrorCode.CORRUPT_IMAGE, f"{item.url}: cannot be decoded"))
    writer.checkpoint((*embedded, *failed))


def test_a_batch_written_before_the_counts_existed_is_counted_from_its_events(s3: Any, model: ClipModel) -> None:
    write_child(s3, model, "m-1", 0, [entry("a.jpg"), entry("b.jpg")], [entry("c.jpg")])
    write_child(s3, model, "m-1", 1, [entry("d.jpg")], [entry("e.jpg")])
    write_child(s3, model, "m-1", 2, [entry("f.jpg")], [entry("g.jpg")])
    old, copied = batches(s3, model.id)[1:]
    s3.copy_object(Bucket=OUTPUT_BUCKET, Key=old, CopySource={"Bucket": OUTPUT_BUCKET, "Key": old}, MetadataDirective="REPLACE")
    assert keys.EVENTS_OUTCOMES_METADATA not in s3.head_object(Bucket=OUTPUT_BUCKET, Key=old)["Metadata"]
    # Copied by a tool that put metadata of its own under the name: not believed, the events counted.
    s3.copy_object(
        Bucket=OUTPUT_BUCKET,
        Key=copied,
        CopySource={"Bucket": OUTPUT_BUCKET, "Key": copied},
        MetadataDirective="REPLACE",
        Metadata={keys.EVENTS_OUTCOMES_METADATA: "created=1"},
    )

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", model.id)

    assert (outcomes.embedded, dict(outcomes.failed)) == (4, {"corrupt-image": 3})
    assert sorted(retry.latest_failures(s3, OUTPUT_BUCKET, "", model.id)) == [url("c.jpg"), url("e.jpg"), url("g.jpg")]


def test_an_object_delivered_twice_counts_in_each_job_and_is_found_embedded_once(s3: Any, model: ClipModel) -> None:
    # The second delivery of cat.png's notification went into a job of its own.
    write_child(s3, model, "m-1", 0, [entry("cat.png"), entry("rocket.png")], [])
    write_child(s3, model, "m-2", 0, [entry("cat.png")], [])

    assert report.tally(s3, OUTPUT_BUCKET, "", model.id).embedded == 3
    assert len(report.embedded_etags(s3, OUTPUT_BUCKET, "", model.id)) == 2


def recorded_calls(s3: Any) -> list[str]:
    calls: list[str] = []
    s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    return calls


@pytest.mark.parametrize("per_child", [5, 500])
def test_counting_costs_a_head_per_child_whatever_the_images_and_a_get_per_child_holding_failures(
    s3: Any, model: ClipModel, per_child: int
) -> None:
    # Three children; only the last holds failures.
    for child in range(3):
        embedded = [entry(f"{child}/img-{i}.jpg") for i in range(per_child)]
        write_child(s3, model, "m-1", child, embedded, [entry(f"{child}/bad-{i}.jpg") for i in range(2)] if child == 2 else [])
    for n in range(3):
        reject(s3, f"notes-{n}.jpg", b"not an image")
    calls = recorded_calls(s3)

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", model.id)

    assert (outcomes.embedded, outcomes.failed.total(), outcomes.rejected) == (3 * per_child, 2, 3)
    # A LIST of the batches and one of the rejections; a HEAD per child; the failures shown from the
    # one batch that holds any; each rejection shown (there are fewer than report.EXAMPLES).
    assert sorted(calls) == sorted(["ListObjectsV2"] * 2 + ["HeadObject"] * 3 + ["GetObject"] * (1 + 3))

    calls.clear()
    failed = retry.latest_failures(s3, OUTPUT_BUCKET, "", model.id)

    assert set(failed) == {url("2/bad-0.jpg"), url("2/bad-1.jpg")}
    assert sorted(calls) == ["GetObject", "HeadObject", "HeadObject", "HeadObject", "ListObjectsV2"]


def test_status_shows_a_few_failures_by_url_and_counts_them_all(s3: Any, model: ClipModel) -> None:
    count = report.EXAMPLES + 5
    for child in range(3):
        write_child(
            s3, model, "m-1", child, [], [entry(f"bad-{i:02d}.jpg") for i in range(child * 10, min(count, child * 10 + 10))]
        )
    calls = recorded_calls(s3)

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", model.id)

    assert (outcomes.embedded, dict(outcomes.failed)) == (0, {"corrupt-image": count})
    assert sorted(outcomes.failed_examples) == [url(f"bad-{i:02d}.jpg") for i in range(report.EXAMPLES)]
    # The examples come from the first batches only: two of the three.
    assert calls.count("GetObject") == 2
    assert len(retry.latest_failures(s3, OUTPUT_BUCKET, "", model.id)) == count


def test_retry_takes_each_object_s_latest_failure_with_the_version_that_failed(s3: Any, model: ClipModel) -> None:
    write_child(s3, model, "m-1", 0, [entry("c.jpg")], [entry("a.jpg"), entry("b.jpg")])
    # a.jpg failed again in a later job (a duplicate delivery); b.jpg was replaced, and the new version embedded.
    write_child(s3, model, "m-2", 0, [entry("b.jpg", etag="e2")], [entry("a.jpg")])

    failed = retry.latest_failures(s3, OUTPUT_BUCKET, "", model.id)

    assert sorted(failed) == [url("a.jpg"), url("b.jpg")]
    later = json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=keys.events_key("", model.id, "m-2", 0))["Body"].read())
    assert failed[url("a.jpg")].failure_id == next(event["id"] for event in later if event["type"] == "document-failed")
    # The version that failed, which `retry` compares with today's.
    assert failed[url("b.jpg")].etag == "e1"


def test_status_reads_a_few_batches_for_examples_however_thin_the_failures_are_spread(s3: Any, model: ClipModel) -> None:
    # One failure in each of many children, as failures spread through a backfill are.
    children = 2 * report.EXAMPLES
    for child in range(children):
        write_child(s3, model, "m-1", child, [entry(f"good-{child:02d}.jpg")], [entry(f"bad-{child:02d}.jpg")])
    calls = recorded_calls(s3)

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", model.id)

    assert (outcomes.embedded, outcomes.failed.total()) == (children, children)
    assert sorted(outcomes.failed_examples) == [url(f"bad-{child:02d}.jpg") for child in range(report.EXAMPLE_BATCHES)]
    assert calls.count("GetObject") == report.EXAMPLE_BATCHES
    # retry needs them all: every batch holding one is read.
    calls.clear()
    assert len(retry.latest_failures(s3, OUTPUT_BUCKET, "", model.id)) == children
    assert calls.count("GetObject") == children


def test_a_batch_removed_while_status_reads_counts_nothing_and_stops_nothing(s3: Any, model: ClipModel) -> None:
    write_child(s3, model, "m-1", 0, [entry("a.jpg")], [entry("b.jpg")])
    write_child(s3, model, "m-1", 1, [entry("c.jpg")], [entry("d.jpg")])
    reject(s3, "notes.jpg", b"milk, eggs")
    gone = {batches(s3, model.id)[0], keys.rejection_key("", INPUT_BUCKET, "notes.jpg")}

    def expire(params: dict[str, Any], **_: Any) -> None:
        # Listed, then removed (outputs expired, or an operator removed a job's) before it is read.
        if params["Key"] in gone:
            s3.delete_object(Bucket=OUTPUT_BUCKET, Key=params["Key"])

    for operation in ("HeadObject", "GetObject"):
        s3.meta.events.register(f"before-parameter-build.s3.{operation}", expire)
    outcomes = report.tally(s3, OUTPUT_BUCKET, "", model.id)

    assert (outcomes.embedded, dict(outcomes.failed), outcomes.rejected) == (1, {"corrupt-image": 1}, 1)
    assert outcomes.rejected_examples == {}


def test_the_status_table_shows_failures_by_code_and_how_many_it_does_not_list() -> None:
    shown = report.Failure("corrupt-image", "cannot be decoded")
    outcomes = report.Outcomes(
        embedded=7,
        failed=Counter({"corrupt-image": 30, "download-failed": 2}),
        rejected=1,
        failed_examples={url("bad.jpg"): shown},
        rejected_examples={url("notes.jpg"): report.Failure("unsupported-type", "text")},
    )
    table = Table(show_header=False)
    _outcome_rows(table, outcomes)
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()

    assert "failed   │ 32 (corrupt-image 30, download-failed 2)" in text
    assert f"{url('bad.jpg')}: corrupt-image: cannot be decoded" in text
    assert "and 31 more; `clip-pipeline retry --dry-run` counts those a retry would take" in text
    # Every rejection is listed: nothing more to say under it.
    assert text.index("rejected") < text.index("notes.jpg") < text.index("failed") and text.count("more") == 1
