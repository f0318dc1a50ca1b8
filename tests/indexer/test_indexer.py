"""The indexer handler, driven with events/sqs-s3-*.json pointed at what the real worker wrote (conftest.World)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pytest

from clip_indexer import train
from clip_shared import keys
from clip_store.recall import RecallPolicy
from clip_worker.labels import DEFAULT_LABELS, baked_path
from tests.indexer.conftest import EVENTS, World, batch, sample, urls
from tests.store.support import put_shard, shard, stored, unit_vectors
from tests.support import INPUT_BUCKET, OUTPUT_BUCKET, encode, photo, stored_vectors, upload


def test_a_finished_shard_becomes_searchable_once_however_often_it_is_announced(world: World) -> None:
    s3, embed, invoke, store, model_id = world.s3, world.embed, world.invoke, world.store, world.model_id
    files = {f"photos/{name}": encode(photo(name), "PNG") for name in ("chelsea.png", "coffee.png", "astronaut.png")}
    shard = embed(files, "m-1")
    announced = sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, shard)

    assert invoke(announced) == {"batchItemFailures": []}
    assert invoke(announced) == {"batchItemFailures": []}

    assert store.count() == 3
    vectors = stored_vectors(s3, model_id)
    for key, vector in vectors.items():
        assert store.nearest(vector, 1)[0].url == keys.s3_url(INPUT_BUCKET, key)
        np.testing.assert_allclose(stored(store, keys.s3_url(INPUT_BUCKET, key)), vector, atol=1e-6)


def test_a_deleted_upload_leaves_search_and_comes_back_when_uploaded_again(world: World) -> None:
    s3, embed, invoke, store, model_id = world.s3, world.embed, world.invoke, world.store, world.model_id
    files = {"photos/cat.png": encode(photo(), "PNG"), "photos/rocket.png": encode(photo("rocket.jpg"), "PNG")}
    invoke(sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, embed(files, "m-1")))
    cat = stored_vectors(s3, model_id)["photos/cat.png"]

    s3.delete_object(Bucket=INPUT_BUCKET, Key="photos/cat.png")  # a delete marker: the object is gone
    assert invoke(sample("sqs-s3-object-removed.json", INPUT_BUCKET, "photos/cat.png")) == {"batchItemFailures": []}
    assert [match.url for match in store.nearest(cat, 5)] == urls("photos/rocket.png")
    # The shard that embedded it, announced again late, does not bring it back.
    invoke(sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, keys.parquet_key("", model_id, "m-1", 0)))
    assert store.vector_of(urls("photos/cat.png")[0]) is None

    invoke(sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, embed({"photos/cat.png": encode(photo(), "PNG")}, "m-2")))
    assert store.nearest(cat, 1)[0].url == urls("photos/cat.png")[0]


def test_removing_an_old_version_leaves_the_current_object_in_search(world: World) -> None:
    s3, embed, invoke, store = world.s3, world.embed, world.invoke, world.store
    invoke(sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, embed({"photos/cat.png": encode(photo(), "PNG")}, "m-1")))
    upload(s3, {"photos/cat.png": encode(photo().rotate(90), "PNG")})
    old = s3.list_object_versions(Bucket=INPUT_BUCKET, Prefix="photos/cat.png")["Versions"][-1]["VersionId"]
    s3.delete_object(Bucket=INPUT_BUCKET, Key="photos/cat.png", VersionId=old)

    invoke(world.removed("photos/cat.png", "ObjectRemoved:Delete"))

    # The current version (not yet embedded) is what search must hold: not the removed one's vector,
    # and nothing is sent back to be embedded, since its own upload's notification already was.
    current = s3.head_object(Bucket=INPUT_BUCKET, Key="photos/cat.png")["ETag"].strip('"')
    assert store.count() == 0 and world.sent_to_dispatcher() == [("photos/cat.png", current)]


def test_an_unreadable_shard_fails_its_own_message_and_holds_up_no_other(world: World) -> None:
    s3, embed, invoke, store, model_id = world.s3, world.embed, world.invoke, world.store, world.model_id
    good = embed({"photos/cat.png": encode(photo(), "PNG")}, "m-1")
    broken = keys.parquet_key("", model_id, "m-broken", 0)
    s3.put_object(Bucket=OUTPUT_BUCKET, Key=broken, Body=b"not a parquet file")
    event = batch(
        sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, good), sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, broken)
    )

    response = invoke(event)

    # SQS redelivers the broken one, then parks it in the dead-letter queue under its alarm.
    assert response == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}
    assert store.count() == 1


def test_notifications_of_other_objects_and_s3s_test_event_are_ignored(world: World) -> None:
    invoke, store = world.invoke, world.store
    test_event = json.loads((EVENTS / "sqs-s3-test-event.json").read_text())
    other = sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, "manifests/m-1/shard-00000.json")

    assert invoke(batch(test_event, other)) == {"batchItemFailures": []}
    assert store.count() == 0


@pytest.mark.parametrize("world", [{"INDEX_MAX_TRAIN_ROWS": "10000"}], indirect=True)
def test_an_index_too_big_to_train_within_the_function_is_submitted_once_as_a_batch_job(
    world: World, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    invoke, store, model_id = world.invoke, world.store, world.model_id
    names = [f"photos/{i:05d}.jpg" for i in range(10_001)]  # past IndexPolicy.exact_below: a build is due
    big = put_shard(shard(names, unit_vectors(len(names), 32, seed=1)), keys.parquet_key("", model_id, "m-big", 0))
    announced = sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, keys.parse_s3_url(big)[1])
    capsys.readouterr()

    assert invoke(announced) == {"batchItemFailures": []}

    # Ingested and searchable (exactly), but not trained on here: the batch is not held up by it.
    assert store.count() == len(names) and store.index_state().index_type is None
    assert store.nearest(unit_vectors(1, 32, seed=1)[0], 1)[0].url == keys.s3_url(INPUT_BUCKET, names[0])
    [job] = world.training_jobs()
    described = boto3.client("batch").describe_jobs(jobs=[job["jobId"]])["jobs"][0]
    assert described["container"]["command"] == ["python", "-m", "clip_indexer.train", model_id]
    warning = next(record for record in caplog.records if record.levelname == "WARNING")
    extra = vars(warning)  # Powertools' keyword arguments, each a key of the JSON line
    assert (extra["due"], extra["rows"], extra["max_train_rows"], extra["job_id"]) == ("build", 10_001, 10_000, job["jobId"])
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert [metric["IndexTrainingSubmitted"] for metric in metrics if "IndexTrainingSubmitted" in metric] == [[1.0]]

    # Redelivered, or the next batch: the training is already on its way, so nothing more is submitted.
    assert invoke(announced) == {"batchItemFailures": []}
    assert len(world.training_jobs()) == 1
    # The job ends (python -m clip_indexer.train, here without its image): it trains, and releases the marker.
    assert train.main([model_id]) == 0
    state = store.index_state()
    assert (state.index_type, state.trained_rows) == ("IVF_RQ", 10_001)
    assert state.tuning is not None and state.tuning.rows == 10_001  # measured by the job, recorded for readers
    # The marker is gone: a later training due is submitted again.
    assert not world.s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=keys.training_job_key("", model_id)).get("Contents")


def test_the_indexer_measures_recall_with_the_baked_label_prompts_and_alarms_below_the_target(
    world: World,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    invoke, store, model_id = world.invoke, world.store, world.model_id
    # The label set's prompt vectors, where the query image bakes them (clip_worker.bake).
    baked = baked_path(model_id, DEFAULT_LABELS, str(tmp_path))
    baked.parent.mkdir(parents=True)
    np.save(baked, unit_vectors(40, 32, seed=3))
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    # A target no setting reaches (4-bit codes rank 10,001 uniform 32-d vectors well enough for 0.98),
    # given to the handler the world loaded as Lambda would (local.load_handler's module).
    loaded = next(module for name, module in sys.modules.items() if name.startswith("local_clip_indexer_"))
    monkeypatch.setattr(loaded, "POLICY", replace(loaded.POLICY, recall=RecallPolicy(target=1.01)))
    names = [f"photos/{i:05d}.jpg" for i in range(10_001)]
    big = put_shard(shard(names, unit_vectors(len(names), 32, seed=4)), keys.parquet_key("", model_id, "m-big", 0))
    capsys.readouterr()

    assert invoke(sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, keys.parse_s3_url(big)[1])) == {"batchItemFailures": []}

    tuning = store.index_state().tuning
    assert tuning is not None and set(tuning.recall) == {"images", "shifted", "blurred", "texts"} and not tuning.reached
    error = next(record for record in caplog.records if record.levelname == "ERROR")
    assert "target recall" in error.getMessage()
    assert (vars(error)["nprobes"], vars(error)["recall"]) == (tuning.nprobes, tuning.recall)
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert [metric["SearchRecallBelowTarget"] for metric in metrics if "SearchRecallBelowTarget" in metric] == [[1.0]]
    assert world.training_jobs() == []  # within the function's bound: trained here, nothing submitted
