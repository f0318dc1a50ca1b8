"""The worker end to end on moto S3: real photos in, vectors, CloudEvents and Parquet out."""

from __future__ import annotations

import io
import json
import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from clip_shared import keys
from clip_shared.manifest import ManifestEntry, ManifestError
from clip_worker.config import WorkerConfig
from clip_worker.labels import PROMPT, LabelSet, read_labels
from clip_worker.model import load
from clip_worker.__main__ import main
from clip_worker.runner import EXIT_FAILED, EXIT_OK, run
from cloudevents.core.formats.json import JSONFormat
from PIL import Image

from tests.support import (
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    TINY_MODEL,
    all_formats,
    cosine,
    encode,
    photo,
    put_manifest,
    reference_embedding,
    tiny_worker_config,
    upload,
)


@pytest.fixture
def config(tiny_config: Path, tiny_checkpoint: Path) -> WorkerConfig:
    return tiny_worker_config(tiny_config, tiny_checkpoint)


def model_id(config: WorkerConfig) -> str:
    return load(config.model, config.pretrained, "cpu").id


def read_json(s3: Any, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())


def read_event(s3: Any, mid: str, key: str) -> Any:
    body = s3.get_object(Bucket=OUTPUT_BUCKET, Key=keys.event_key("", mid, INPUT_BUCKET, key))["Body"].read()
    JSONFormat().read(None, body)  # raises unless it is a valid CloudEvent
    return json.loads(body)


def read_shard(s3: Any, url: str) -> Any:
    bucket, key = keys.parse_s3_url(url)
    return pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def test_every_format_gets_a_unit_vector_matching_open_clip_and_a_cloudevent(s3: Any, config: WorkerConfig) -> None:
    formats = all_formats(photo())
    files = {f"photos/{name}": data for name, (data, _, _) in formats.items()}
    files["photos/with space/café ü.jpg"] = formats["photo.jpg"][0]
    uri = put_manifest(s3, upload(s3, files))

    summary = run(replace(config, manifest_uri=uri, job_id="job-123"), s3=s3)

    assert summary.exit_code == EXIT_OK
    assert (summary.progress.embedded, summary.progress.failed) == (len(files), 0)
    mid = model_id(config)
    for key in files:
        name = key.rsplit("/", 1)[-1]
        _, mime, seen = formats.get(name, formats["photo.jpg"])
        vector = np.asarray(read_json(s3, keys.vector_key("", mid, INPUT_BUCKET, key)))
        assert vector.shape == (32,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        assert cosine(vector, reference_embedding(seen, TINY_MODEL, config.pretrained)) >= 0.999, key

        event = read_event(s3, mid, key)
        assert event["specversion"] == "1.0" and event["type"] == "document-created"
        assert event["id"] and event["time"] and event["source"]
        data = event["data"]
        assert data["chainId"] == "job-123"
        assert data["source"] == data["document"]
        assert data["document"]["url"] == f"s3://{INPUT_BUCKET}/{key}"
        assert data["document"]["type"] == mime
        assert data["document"]["size"] == len(files[key])
        assert data["document"]["etag"]
        embeddings = data["metadata"]["properties"]["attrs"]["embeddings"]
        assert data["metadata"]["properties"]["kind"] == "image"
        assert embeddings == {
            "vectors": f"s3://{OUTPUT_BUCKET}/{keys.vector_key('', mid, INPUT_BUCKET, key)}",
            "model": TINY_MODEL,
            "pretrained": config.pretrained,
            "dimensions": 32,
        }
        # Without CLIP_LABELS the document has no keywords at all.
        assert set(data["metadata"]) == {"properties"} and set(data["metadata"]["properties"]["attrs"]) == {"embeddings"}

    shard = read_shard(s3, summary.shard_url)
    assert sorted(shard.column("key").to_pylist()) == sorted(files)
    stored = np.asarray(read_json(s3, keys.vector_key("", mid, INPUT_BUCKET, "photos/photo.png")))
    row = shard.column("key").to_pylist().index("photos/photo.png")
    np.testing.assert_allclose(np.asarray(shard.column("vector")[row].as_py()), stored, rtol=1e-6)


def test_each_bad_input_gets_exactly_one_failure_and_the_rest_still_succeed(s3: Any, config: WorkerConfig) -> None:
    good = encode(photo(), "JPEG")
    files = {
        "ok.jpg": good,
        "truncated.jpg": good[: len(good) // 3],
        "noise.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "notes.jpg": b"a text file pretending to be a JPEG",
        "bomb.png": encode(photo().resize((2000, 2000)).convert("L"), "PNG"),
        "huge.bmp": encode(photo().resize((700, 700)), "BMP"),
    }
    entries = upload(s3, files)
    entries.append(ManifestEntry(bucket=INPUT_BUCKET, key="deleted.jpg", size=10, etag="x", mime_type="image/jpeg"))
    uri = put_manifest(s3, entries)

    limits = replace(config, manifest_uri=uri, max_image_pixels=1_000_000, max_object_bytes=1_000_000)
    summary = run(limits, s3=s3)

    assert summary.exit_code == EXIT_OK
    assert (summary.progress.embedded, summary.progress.failed) == (1, 6)
    mid = model_id(config)
    expected = {
        "truncated.jpg": "corrupt-image",
        "noise.png": "corrupt-image",
        "notes.jpg": "unsupported-type",
        "bomb.png": "too-many-pixels",
        "huge.bmp": "object-too-large",
        "deleted.jpg": "object-not-found",
    }
    events = s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=f"events/{mid}/")["Contents"]
    assert len(events) == len(expected) + 1
    for key, code in expected.items():
        event = read_event(s3, mid, key)
        assert event["type"] == "document-failed"
        assert event["data"]["error"]["code"] == code
        assert f"s3://{INPUT_BUCKET}/{key}" in event["data"]["error"]["message"]
    assert read_event(s3, mid, "ok.jpg")["type"] == "document-created"


def test_array_children_cover_every_entry_exactly_once(s3: Any, config: WorkerConfig) -> None:
    files = {f"img-{i:02d}.png": encode(photo().rotate(i * 10), "PNG") for i in range(7)}
    uri = put_manifest(s3, upload(s3, files), shard_size=3)

    seen: list[str] = []
    for index in range(3):
        summary = run(replace(config, manifest_uri=uri, array_index=index), s3=s3)
        assert summary.shard_url.endswith(f"shard-{index:05d}.parquet")
        seen += read_shard(s3, summary.shard_url).column("key").to_pylist()
    assert sorted(seen) == sorted(files)

    with pytest.raises(ManifestError, match="array index 3"):
        run(replace(config, manifest_uri=uri, array_index=3), s3=s3)


def test_second_run_skips_finished_work_and_redoes_only_what_changed(s3: Any, config: WorkerConfig) -> None:
    files = {f"img-{i}.png": encode(photo().rotate(i * 30), "PNG") for i in range(5)}
    entries = upload(s3, files)
    uri = put_manifest(s3, entries)
    first = run(replace(config, manifest_uri=uri), s3=s3)
    assert first.progress.embedded == 5

    second = run(replace(config, manifest_uri=uri), s3=s3)
    assert (second.progress.embedded, second.progress.skipped) == (0, 5)
    # The shard of a resumed run still holds every vector, the reused ones included.
    assert read_shard(s3, second.shard_url).num_rows == 5

    # A new version of one object is embedded again; its neighbours are not.
    entries[:1] = upload(s3, {"img-0.png": encode(photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")})
    uri = put_manifest(s3, entries, manifest_id="m-2")
    third = run(replace(config, manifest_uri=uri), s3=s3)
    assert (third.progress.embedded, third.progress.skipped) == (1, 4)


def test_with_a_label_set_each_created_event_lists_the_top_k_labels_of_its_stored_vector(s3: Any, config: WorkerConfig) -> None:
    # Five photos in batches of four: keywords come from a full batch and from the last, short one.
    names = ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    files = {f"photos/{name}": encode(photo(name), "PNG") for name in names}
    labels_uri = f"s3://{OUTPUT_BUCKET}/labels.txt"
    s3.put_object(Bucket=OUTPUT_BUCKET, Key="labels.txt", Body=b"cat\nastronaut\ncup of coffee\nrocket\nmotorcycle\nbeach\n")
    uri = put_manifest(s3, upload(s3, files))

    summary = run(replace(config, manifest_uri=uri, labels=labels_uri, keywords_top_k=3), s3=s3)

    assert (summary.exit_code, summary.progress.embedded) == (EXIT_OK, len(files))
    model = load(config.model, config.pretrained, "cpu")
    label_set = LabelSet.embed(model, read_labels(labels_uri, s3))
    for key in files:
        vector = np.asarray(read_json(s3, keys.vector_key("", model.id, INPUT_BUCKET, key)), dtype=np.float32)
        expected = label_set.top(vector[np.newaxis], 3)[0]
        metadata = read_event(s3, model.id, key)["data"]["metadata"]
        assert metadata["keywords"] == [label.label for label in expected], key
        attrs = metadata["properties"]["attrs"]
        assert attrs["zeroShot"] == {"prompt": PROMPT, "labelCount": 6}
        assert [item["label"] for item in attrs["keywords"]] == metadata["keywords"]
        for item, label in zip(attrs["keywords"], expected):
            assert item["score"] == pytest.approx(label.score, abs=2e-6)
            assert item["probability"] == pytest.approx(label.probability, abs=2e-6)


def test_an_unreadable_label_set_fails_the_job_with_one_line_naming_it(
    s3: Any, config: WorkerConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    uri = put_manifest(s3, upload(s3, {"cat.png": encode(photo(), "PNG")}))
    missing = f"s3://{OUTPUT_BUCKET}/no-such-labels.txt"
    env = {
        "MANIFEST_URI": uri,
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "CLIP_MODEL": config.model,
        "CLIP_MODEL_CONFIG": str(config.model_config_path),
        "CLIP_PRETRAINED": config.pretrained,
        "DEVICE": "cpu",
        "CLIP_LABELS": missing,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert main() == EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() installs its own handler

    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].startswith(f"cannot read the label set {missing}: "), errors
    assert not s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="events/").get("KeyCount")
