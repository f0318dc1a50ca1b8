from __future__ import annotations

import json

import pytest

from clip_shared.manifest import SCHEMA_VERSION, Manifest, ManifestEntry, ManifestError


def manifest(count: int, shard_size: int) -> Manifest:
    entries = tuple(
        ManifestEntry(bucket="in-bucket", key=f"k{i}", size=1, etag=f"e{i}", mime_type="image/png") for i in range(count)
    )
    return Manifest(manifest_id="m", shard_size=shard_size, entries=entries)


@pytest.mark.parametrize(("count", "shard_size", "shards"), [(0, 10, 1), (1, 10, 1), (10, 10, 1), (11, 10, 2), (25, 4, 7)])
def test_shards_cover_every_entry_once_in_order(count: int, shard_size: int, shards: int) -> None:
    m = manifest(count, shard_size)
    assert m.shard_count == shards
    assert [e for i in range(m.shard_count) for e in m.shard(i)] == list(m.entries)
    assert m.shard(None) == m.entries


def test_round_trip_uses_camel_case_and_a_schema_version() -> None:
    m = manifest(2, 1)
    document = json.loads(m.to_json())
    assert document["schemaVersion"] == SCHEMA_VERSION and document["shardSize"] == 1
    assert set(document["entries"][0]) == {"bucket", "key", "size", "etag", "mimeType"}
    assert Manifest.from_json(m.to_json()) == m


def test_unknown_schema_version_and_bad_documents_are_refused_by_name() -> None:
    document = json.loads(manifest(1, 1).to_json())
    document["schemaVersion"] = 99
    with pytest.raises(ManifestError, match="s3://b/m.json has schemaVersion 99"):
        Manifest.from_json(json.dumps(document), source="s3://b/m.json")
    with pytest.raises(ManifestError, match="s3://b/m.json is not a valid manifest"):
        Manifest.from_json(b'{"entries": "nope"}', source="s3://b/m.json")
