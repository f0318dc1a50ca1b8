"""The store ends agreeing with the versioned input bucket, whatever S3 notifies and in whatever order:
each test is a sequence real buckets produce, run through the real dispatcher, worker and indexer
handlers with notifications as S3 encodes them (docs/search.md, "Consistency")."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import boto3
import botocore.client
import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aws_lambda_powertools.utilities.parser.models import S3Model
from lancedb.table import LanceTable

from clip_shared import keys
from clip_store import IndexPolicy
from tests.indexer.conftest import MAX_OBJECT_BYTES, World, batch, urls
from tests.store.support import put_shard, shard, stored, unit_vectors
from tests.support import AWKWARD_KEYS, INPUT_BUCKET, OUTPUT_BUCKET, encode, photo

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "camera.png", "moon.png")


def image(n: int) -> bytes:
    """A small real photo, different for each n (the tiny model sees 64x64)."""
    return encode(photo(PHOTOS[n % len(PHOTOS)]).resize((96, 96)).rotate(n * 7), "PNG")


def etag_of(world: World, key: str) -> str:
    return str(world.s3.head_object(Bucket=INPUT_BUCKET, Key=key)["ETag"]).strip('"')


def version_ids(world: World, key: str) -> list[str]:
    """Every version of exactly `key`, newest first (delete markers left out)."""
    listed = world.s3.list_object_versions(Bucket=INPUT_BUCKET, Prefix=key).get("Versions", [])
    return [version["VersionId"] for version in listed if version["Key"] == key]


def searchable(world: World) -> set[str]:
    table = world.store.table()
    return set() if table is None else set(table.to_arrow().column("url").to_pylist())


def test_keys_with_url_characters_leave_and_stay_exactly_as_s3_says(world: World) -> None:
    names = ["live#1.jpg", "live", "report#draft.jpg", "report", *AWKWARD_KEYS]
    assert world.invoke(world.shard_created(world.embed({name: image(n) for n, name in enumerate(names)}, "m-1"))) == {
        "batchItemFailures": []
    }
    assert searchable(world) == set(urls(*names))

    # An old version of live#1.jpg removed: the object stays (a HEAD of `live` said otherwise).
    world.s3.put_object(Bucket=INPUT_BUCKET, Key="live#1.jpg", Body=image(40))
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="live#1.jpg", VersionId=version_ids(world, "live#1.jpg")[-1])
    # report#draft.jpg deleted while `report` exists: it leaves (a HEAD of `report` said it was there).
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="report#draft.jpg")
    for name in AWKWARD_KEYS:
        world.s3.delete_object(Bucket=INPUT_BUCKET, Key=name)
    removals = [world.removed("live#1.jpg", "ObjectRemoved:Delete"), world.removed("report#draft.jpg")]
    assert world.invoke(batch(*removals, *(world.removed(name) for name in AWKWARD_KEYS))) == {"batchItemFailures": []}

    # live#1.jpg's current version is the one not embedded yet: its old vector left, the new one was asked for.
    assert searchable(world) == set(urls("live", "report"))
    assert world.sent_to_dispatcher() == [("live#1.jpg", etag_of(world, "live#1.jpg"))]
    # Uploaded again, an awkward key comes back.
    world.invoke(world.shard_created(world.embed({"IMG #12.jpg": image(50)}, "m-2")))
    assert searchable(world) == set(urls("live", "report", "IMG #12.jpg"))


def test_one_bad_shard_fails_its_own_message_and_nothing_else(world: World) -> None:
    good = world.embed({"cat.png": image(1), "dog.png": image(2)}, "m-1")
    world.invoke(world.shard_created(good))
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="dog.png")
    other_width = put_shard(shard(["wide.jpg"], unit_vectors(1, 16, seed=1)), keys.parquet_key("", world.model_id, "m-wide", 0))
    variable = shard(["list.jpg"], unit_vectors(1, 32, seed=2))
    variable = variable.set_column(
        variable.schema.get_field_index("vector"), "vector", pa.array([[0.5] * 32], pa.list_(pa.float32()))
    )
    variable_key = put_shard(variable, keys.parquet_key("", world.model_id, "m-list", 0))
    missing = keys.parquet_key("", world.model_id, "m-missing", 0)
    another_model = put_shard(shard(["b.jpg"], unit_vectors(1, 8, seed=3)), keys.parquet_key("", "other__model", "m-1", 0))
    fresh = world.embed({"fox.png": image(3)}, "m-2")

    response = world.invoke(
        batch(
            world.shard_created(keys.parse_s3_url(other_width)[1]),
            world.shard_created(fresh),
            world.shard_created(keys.parse_s3_url(variable_key)[1]),
            world.removed("dog.png"),
            world.shard_created(missing),
            world.shard_created(keys.parse_s3_url(another_model)[1]),
        )
    )

    assert sorted(failure["itemIdentifier"] for failure in response["batchItemFailures"]) == [
        "message-0",
        "message-2",
        "message-4",
    ]
    assert searchable(world) == set(urls("cat.png", "fox.png"))


def test_a_removal_before_the_models_store_exists_is_kept(world: World) -> None:
    late = world.embed({"cat.png": image(1), "dog.png": image(2)}, "m-1")  # the job ran; its shard is not ingested yet
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="cat.png")

    assert world.invoke(world.removed("cat.png")) == {"batchItemFailures": []}
    assert world.store.table() is None
    world.invoke(world.shard_created(late))

    assert searchable(world) == set(urls("dog.png"))


def test_deleting_the_current_version_brings_the_previous_one_back_into_search(world: World) -> None:
    world.invoke(world.shard_created(world.embed({"cat.png": image(1)}, "m-1")))
    first = stored(world.store, urls("cat.png")[0])
    world.invoke(world.shard_created(world.embed({"cat.png": image(2)}, "m-2")))
    assert not np.allclose(stored(world.store, urls("cat.png")[0]), first)

    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="cat.png", VersionId=version_ids(world, "cat.png")[0])
    world.invoke(world.removed("cat.png", "ObjectRemoved:Delete"))

    # The removed version's vector left at once; the uncovered one went to the dispatcher, as S3's
    # own notification would, and its shard puts it back.
    assert searchable(world) == set()
    [(key, etag)] = world.sent_to_dispatcher()
    assert (key, etag) == ("cat.png", etag_of(world, "cat.png"))
    world.invoke(world.shard_created(world.embed({"cat.png": image(1)}, "m-3")))
    np.testing.assert_allclose(stored(world.store, urls("cat.png")[0]), first, atol=1e-6)


def test_undeleting_an_object_brings_it_back_into_search(world: World) -> None:
    world.invoke(world.shard_created(world.embed({"cat.png": image(1), "dog.png": image(2)}, "m-1")))
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="cat.png")
    world.invoke(world.removed("cat.png"))
    assert searchable(world) == set(urls("dog.png"))

    markers = world.s3.list_object_versions(Bucket=INPUT_BUCKET, Prefix="cat.png")["DeleteMarkers"]
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="cat.png", VersionId=markers[0]["VersionId"])  # the console's "undelete"
    world.invoke(world.removed("cat.png", "ObjectRemoved:Delete"))

    [sent] = _raw_messages(world)
    # What the indexer sends is an S3 notification the dispatcher's parser takes like any other.
    announced = S3Model.model_validate_json(sent).Records[0].s3.object
    assert announced is not None and keys.notified_key(announced.key) == "cat.png"
    world.invoke(world.shard_created(world.embed({"cat.png": image(1)}, "m-2")))
    assert searchable(world) == set(urls("cat.png", "dog.png"))


def _raw_messages(world: World) -> list[str]:
    return [message["Body"] for message in boto3.client("sqs").receive_message(QueueUrl=world.upload_queue).get("Messages", [])]


@pytest.mark.parametrize(
    "replacement",
    [
        pytest.param(b"%PDF-1.7\n" + b"x" * 400, id="a PDF the dispatcher rejects"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_OBJECT_BYTES + 1), id="an object over the size limit"),
    ],
)
def test_an_image_overwritten_by_something_the_dispatcher_rejects_leaves_search(world: World, replacement: bytes) -> None:
    world.invoke(world.shard_created(world.embed({"f.jpg": image(1), "g.jpg": image(2)}, "m-1")))
    world.s3.put_object(Bucket=INPUT_BUCKET, Key="f.jpg", Body=replacement)

    assert world.dispatch(world.uploaded("f.jpg")) == {"batchItemFailures": []}
    assert world.invoke(world.rejection_written("f.jpg")) == {"batchItemFailures": []}

    assert searchable(world) == set(urls("g.jpg"))
    # A shard of the old version, redelivered, does not bring it back.
    world.invoke(world.shard_created(keys.parquet_key("", world.model_id, "m-1", 0)))
    assert searchable(world) == set(urls("g.jpg"))


def test_an_image_overwritten_by_bytes_the_worker_cannot_decode_leaves_search(world: World) -> None:
    world.invoke(world.shard_created(world.embed({"f.jpg": image(1), "g.jpg": image(2)}, "m-1")))
    truncated = encode(photo(), "JPEG")[:600]  # sniffed as a JPEG, refused by the decoder

    world.invoke(world.shard_created(world.embed({"f.jpg": truncated}, "m-2")))

    assert searchable(world) == set(urls("g.jpg"))
    body = world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=keys.parquet_key("", world.model_id, "m-2", 0))["Body"].read()
    assert json.loads(pq.read_schema(io.BytesIO(body)).metadata[keys.SHARD_FAILED_METADATA]) == urls("f.jpg")


@pytest.mark.parametrize("event_name", ["LifecycleExpiration:Delete", "LifecycleExpiration:DeleteMarkerCreated"])
def test_a_lifecycle_expiration_removes_from_search(world: World, event_name: str) -> None:
    world.invoke(world.shard_created(world.embed({"old.png": image(1), "new.png": image(2)}, "m-1")))
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="old.png")  # what the expiration did

    assert world.invoke(world.removed("old.png", event_name)) == {"batchItemFailures": []}

    assert searchable(world) == set(urls("new.png"))


@pytest.mark.parametrize("failure", ["Retryable commit conflict for version 7: preempted by concurrent Delete", "disk on fire"])
def test_upkeep_that_fails_never_fails_a_committed_batch(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failure: str
) -> None:
    """Two indexer containers: one's compaction preempted by the other's delete (or any upkeep error)."""

    def refused(self: LanceTable, **options: Any) -> None:
        raise OSError(failure)

    monkeypatch.setattr(LanceTable, "optimize", refused)
    names = [f"p{n}.png" for n in range(IndexPolicy().max_fragments)]
    for n, name in enumerate(names):  # one commit each: compaction falls due on the last
        key = put_shard(shard([name], unit_vectors(1, 32, seed=n)), keys.parquet_key("", world.model_id, f"m-{n}", 0))
        assert world.invoke(world.shard_created(keys.parse_s3_url(key)[1])) == {"batchItemFailures": []}

    assert searchable(world) == set(urls(*names))
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    failed_upkeep = [metric["IndexUpkeepFailed"] for metric in metrics if "IndexUpkeepFailed" in metric]
    assert failed_upkeep == ([] if "conflict" in failure else [[1.0]])


def test_deleting_the_newest_version_keeps_its_late_and_redelivered_shards_out(world: World) -> None:
    world.invoke(world.shard_created(world.embed({"cat.png": image(1)}, "m-1")))
    first = etag_of(world, "cat.png")
    time.sleep(1.1)  # LastModified is kept to the second: the second version is the newer
    second = world.embed({"cat.png": image(2)}, "m-2")  # embedded; its shard not ingested yet
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="cat.png", VersionId=version_ids(world, "cat.png")[0])

    world.invoke(world.removed("cat.png", "ObjectRemoved:Delete"))
    world.invoke(world.shard_created(second))  # late
    assert stored_etags(world) == {urls("cat.png")[0]: first}

    world.invoke(world.shard_created(second))  # and redelivered, after the current version was ingested again
    world.invoke(world.shard_created(keys.parquet_key("", world.model_id, "m-1", 0)))
    world.invoke(world.shard_created(second))
    assert stored_etags(world) == {urls("cat.png")[0]: first}


def test_an_object_s3_will_not_head_fails_only_the_shards_that_hold_it(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    old = world.embed({"cat.png": image(1), "dog.png": image(2)}, "m-1")
    world.invoke(world.shard_created(old))
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="cat.png")
    world.invoke(world.removed("cat.png"))
    world.s3.put_object(Bucket=INPUT_BUCKET, Key="cat.png", Body=b"uploaded again with SSE-C")
    fresh = world.embed({"fox.png": image(3)}, "m-2")
    call = botocore.client.BaseClient._make_api_call

    def refusing(client: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation == "HeadObject" and params.get("Key") == "cat.png":  # S3's 400 to a HEAD without the SSE-C key
            raise botocore.exceptions.ClientError({"Error": {"Code": "400", "Message": "Bad Request"}}, operation)
        return call(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", refusing)
    response = world.invoke(batch(world.shard_created(old), world.shard_created(fresh)))

    assert response == {"batchItemFailures": [{"itemIdentifier": "message-0"}]}
    assert searchable(world) == set(urls("dog.png", "fox.png"))


def test_objects_under_rejected_that_are_not_rejections_and_lifecycle_events_from_s3_itself(world: World) -> None:
    world.s3.put_object(Bucket=OUTPUT_BUCKET, Key="rejected/", Body=b"")  # the console's "Create folder"
    world.s3.put_object(Bucket=OUTPUT_BUCKET, Key="rejected/notes.txt", Body=b"not a CloudEvent")
    assert world.invoke(batch(world.rejection_marker("rejected/"), world.rejection_marker("rejected/notes.txt"))) == {
        "batchItemFailures": []
    }

    world.invoke(world.shard_created(world.embed({"old.png": image(1)}, "m-1")))
    world.s3.delete_object(Bucket=INPUT_BUCKET, Key="old.png")
    expired = json.loads(world.removed("old.png", "LifecycleExpiration:Delete")["Records"][0]["body"])
    record = expired["Records"][0]
    # Fields the indexer never reads, as S3's lifecycle may fill them: no IP address, no version.
    record["requestParameters"]["sourceIPAddress"] = "AWS Internal"
    record["userIdentity"]["principalId"] = "s3.amazonaws.com"
    record["s3"]["object"].pop("versionId", None)
    event = world.removed("old.png")
    event["Records"][0]["body"] = json.dumps(expired)
    assert world.invoke(event) == {"batchItemFailures": []}
    assert searchable(world) == set()


def stored_etags(world: World) -> dict[str, str]:
    table = world.store.table()
    if table is None:
        return {}
    rows = table.to_arrow()
    return dict(zip(rows.column("url").to_pylist(), rows.column("etag").to_pylist(), strict=True))
