"""Reading outcomes back: one row per object however often it was embedded, at one GET per child."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from clip_pipeline import report
from clip_shared import keys
from clip_worker.runner import EXIT_OK, run
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET, encode, photo, put_manifest, tiny_worker_config, upload
from tests.worker.test_runner import model_id


def test_an_object_delivered_twice_is_counted_and_found_once(s3: Any, tiny_config: Path, tiny_checkpoint: Path) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    entries = upload(s3, {"cat.png": encode(photo(), "PNG"), "rocket.png": encode(photo("rocket.jpg"), "PNG")})
    # The second delivery of cat.png's notification went into a job of its own.
    for manifest_id, job in (("m-1", entries), ("m-2", entries[:1])):
        uri = put_manifest(s3, job, manifest_id=manifest_id)
        assert run(replace(config, manifest_uri=uri), s3=s3).exit_code == EXIT_OK
    mid = model_id(config)
    assert len(s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=keys.parquet_prefix("", mid))["Contents"]) == 2

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", mid)
    assert outcomes.embedded == {f"s3://{INPUT_BUCKET}/cat.png", f"s3://{INPUT_BUCKET}/rocket.png"}
    assert outcomes.as_dict()["embedded"] == 2
    assert len(report.embedded_etags(s3, OUTPUT_BUCKET, "", mid)) == 2


def test_reading_outcomes_costs_one_get_per_child_not_per_image(s3: Any, tiny_config: Path, tiny_checkpoint: Path) -> None:
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    files = {f"img-{i}.png": encode(photo().rotate(i * 20), "PNG") for i in range(12)}
    uri = put_manifest(s3, upload(s3, files), shard_size=6)
    for child in (0, 1):
        assert run(replace(config, manifest_uri=uri, array_index=child), s3=s3).exit_code == EXIT_OK
    calls: list[str] = []
    s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))

    outcomes = report.tally(s3, OUTPUT_BUCKET, "", model_id(config))

    assert len(outcomes.embedded) == 12
    assert sorted(calls) == ["GetObject", "GetObject", "ListObjectsV2", "ListObjectsV2"]
