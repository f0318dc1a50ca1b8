"""The indexer handler, driven with events/sqs-s3-*.json pointed at what the real worker wrote, against a
moto server (LanceDB reaches S3 through its own client, so an in-process mock would not do)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import numpy as np
import pytest
import requests

from clip_pipeline import local
from clip_shared import keys
from clip_store import StorageSettings, VectorStore, store_uri
from clip_worker.runner import EXIT_OK, run
from tests.store.support import put_shard, shard, unit_vectors
from tests.support import (
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    encode,
    photo,
    put_manifest,
    stored_vectors,
    tiny_worker_config,
    upload,
)

EVENTS = Path(__file__).resolve().parents[2] / "events"
Invoke = Callable[[dict[str, Any]], dict[str, Any]]


def sample(name: str, bucket: str, key: str) -> dict[str, Any]:
    """A sample event of events/, about `bucket` and `key` (URL-encoded, as S3 writes keys)."""
    event = copy.deepcopy(json.loads((EVENTS / name).read_text()))
    body = json.loads(event["Records"][0]["body"])
    body["Records"][0]["s3"]["bucket"]["name"] = bucket
    body["Records"][0]["s3"]["object"]["key"] = quote_plus(key)
    event["Records"][0]["body"] = json.dumps(body)
    return event


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    records = [record for event in events for record in event["Records"]]
    return {"Records": [{**record, "messageId": f"message-{n}"} for n, record in enumerate(records)]}


@pytest.fixture
def world(
    request: pytest.FixtureRequest, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tiny_config: Path, tiny_checkpoint: Path
) -> Iterator[Any]:
    """(s3, embed, invoke, store, model_id) over the function as deployed; parametrize it with settings to override."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    # moto keeps its accounts in the process, whichever server serves them: each test starts empty.
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=30)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=INPUT_BUCKET)
    s3.put_bucket_versioning(Bucket=INPUT_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    s3.create_bucket(Bucket=OUTPUT_BUCKET)
    config = tiny_worker_config(tiny_config, tiny_checkpoint)
    model_id = keys.model_id(config.model, config.pretrained)
    # The function's environment as template.yaml gives it (events/env.json), set through monkeypatch
    # so that it leaves with the test; loading the handler reads it, as Lambda's init would.
    environment = {
        **json.loads((EVENTS / "env.json").read_text())["IndexerFunction"],
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        **getattr(request, "param", {}),
    }
    with monkeypatch.context() as patch:
        for name, value in {**environment, "POWERTOOLS_TRACE_DISABLED": "true"}.items():
            patch.setenv(name, value)
        with contextlib.redirect_stdout(io.StringIO()):
            handler = local.load_handler(local.INDEXER, dict(environment))

        def embed(files: dict[str, bytes], manifest_id: str) -> str:
            """Uploads `files` and runs the real worker over them; returns its shard's key."""
            uri = put_manifest(s3, upload(s3, files), manifest_id=manifest_id)
            summary = run(replace(config, manifest_uri=uri), s3=s3)
            assert summary.exit_code == EXIT_OK and summary.shard_url is not None
            return keys.parse_s3_url(summary.shard_url)[1]

        def invoke(event: dict[str, Any]) -> dict[str, Any]:
            # Its log lines and metrics go to stdout, as on Lambda (capsys reads them).
            return handler(event, local.LambdaContext("indexer", 900))

        settings = StorageSettings(endpoint=moto_endpoint, region="us-east-1")
        yield s3, embed, invoke, VectorStore(store_uri(OUTPUT_BUCKET, "", model_id), settings=settings), model_id
    # The server outlives the test: leave nothing in it for the next module's tests to find.
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=30)


def urls(*names: str) -> list[str]:
    return [keys.s3_url(INPUT_BUCKET, name) for name in names]


def test_a_finished_shard_becomes_searchable_once_however_often_it_is_announced(world: Any) -> None:
    s3, embed, invoke, store, model_id = world
    files = {f"photos/{name}": encode(photo(name), "PNG") for name in ("chelsea.png", "coffee.png", "astronaut.png")}
    shard = embed(files, "m-1")
    announced = sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, shard)

    assert invoke(announced) == {"batchItemFailures": []}
    assert invoke(announced) == {"batchItemFailures": []}

    assert store.count() == 3
    vectors = stored_vectors(s3, model_id)
    for key, vector in vectors.items():
        assert store.nearest(vector, 1)[0].url == keys.s3_url(INPUT_BUCKET, key)
        np.testing.assert_allclose(store.vector_of(keys.s3_url(INPUT_BUCKET, key)), vector, atol=1e-6)


def test_a_deleted_upload_leaves_search_and_comes_back_when_uploaded_again(world: Any) -> None:
    s3, embed, invoke, store, model_id = world
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


def test_removing_an_old_version_leaves_the_current_object_in_search(world: Any) -> None:
    s3, embed, invoke, store, model_id = world
    invoke(sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, embed({"photos/cat.png": encode(photo(), "PNG")}, "m-1")))
    upload(s3, {"photos/cat.png": encode(photo().rotate(90), "PNG")})
    old = s3.list_object_versions(Bucket=INPUT_BUCKET, Prefix="photos/cat.png")["Versions"][-1]["VersionId"]
    s3.delete_object(Bucket=INPUT_BUCKET, Key="photos/cat.png", VersionId=old)

    invoke(sample("sqs-s3-object-removed.json", INPUT_BUCKET, "photos/cat.png"))

    assert store.count() == 1


def test_an_unreadable_shard_fails_its_own_message_and_holds_up_no_other(world: Any) -> None:
    s3, embed, invoke, store, model_id = world
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


def test_notifications_of_other_objects_and_s3s_test_event_are_ignored(world: Any) -> None:
    s3, embed, invoke, store, model_id = world
    test_event = json.loads((EVENTS / "sqs-s3-test-event.json").read_text())
    other = sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, "manifests/m-1/shard-00000.json")

    assert invoke(batch(test_event, other)) == {"batchItemFailures": []}
    assert store.count() == 0


@pytest.mark.parametrize("world", [{"INDEX_MAX_TRAIN_ROWS": "10000"}], indirect=True)
def test_an_index_too_big_to_train_within_the_function_is_left_to_the_cli_and_says_so(
    world: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    s3, embed, invoke, store, model_id = world
    names = [f"photos/{i:05d}.jpg" for i in range(10_001)]  # past IndexPolicy.exact_below: a build is due
    big = put_shard(shard(names, unit_vectors(len(names), 32, seed=1)), keys.parquet_key("", model_id, "m-big", 0))
    capsys.readouterr()

    assert invoke(sample("sqs-s3-shard-created.json", OUTPUT_BUCKET, keys.parse_s3_url(big)[1])) == {"batchItemFailures": []}

    # Ingested and searchable (exactly), but not trained on here: the batch is not held up by it.
    assert store.count() == len(names) and store.index_state().index_type is None
    assert store.nearest(unit_vectors(1, 32, seed=1)[0], 1)[0].url == keys.s3_url(INPUT_BUCKET, names[0])
    warning = next(record for record in caplog.records if record.levelname == "WARNING")
    assert "clip-pipeline index" in warning.getMessage()
    extra = vars(warning)  # Powertools' keyword arguments, each a key of the JSON line
    assert (extra["due"], extra["rows"], extra["max_train_rows"]) == ("build", 10_001, 10_000)
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert [metric["IndexTrainingDeferred"] for metric in metrics if "IndexTrainingDeferred" in metric] == [[1.0]]
