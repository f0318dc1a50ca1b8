from __future__ import annotations

import json

import pytest

from clip_shared.manifest import MAX_ARRAY_SIZE, SCHEMA_VERSION, Manifest, ManifestEntry, ManifestError, split


def entries(count: int) -> list[ManifestEntry]:
    return [ManifestEntry(bucket="in-bucket", key=f"k{i}", size=1, etag=f"e{i}", mime_type="image/png") for i in range(count)]


@pytest.mark.parametrize(("count", "shard_size", "shards"), [(0, 10, 1), (1, 10, 1), (10, 10, 1), (11, 10, 2), (25, 4, 7)])
def test_a_job_s_files_cover_every_entry_once_in_order(count: int, shard_size: int, shards: int) -> None:
    files = split("m", entries(count), shard_size)
    assert [(f.shard_index, f.shard_count) for f in files] == [(i, shards) for i in range(shards)]
    assert all(len(f.entries) <= shard_size for f in files)
    assert [e for f in files for e in f.entries] == entries(count)


def test_a_job_needing_more_children_than_batch_allows_is_refused() -> None:
    with pytest.raises(ManifestError, match=f"Batch allows {MAX_ARRAY_SIZE}"):
        split("m", entries(MAX_ARRAY_SIZE + 1), 1)


def test_round_trip_uses_camel_case_and_a_schema_version() -> None:
    (m,) = split("m", entries(2), 5)
    document = json.loads(m.to_json())
    assert document["schemaVersion"] == SCHEMA_VERSION == 2
    assert (document["shardIndex"], document["shardCount"]) == (0, 1)
    assert set(document["entries"][0]) == {"bucket", "key", "size", "etag", "mimeType"}
    assert Manifest.from_json(m.to_json()) == m


def test_unknown_schema_version_and_bad_documents_are_refused_by_name() -> None:
    document = json.loads(split("m", entries(1), 1)[0].to_json())
    document["schemaVersion"] = 99
    with pytest.raises(ManifestError, match="s3://b/m.json has schemaVersion 99"):
        Manifest.from_json(json.dumps(document), source="s3://b/m.json")
    with pytest.raises(ManifestError, match="s3://b/m.json is not a valid manifest"):
        Manifest.from_json(b'{"entries": "nope"}', source="s3://b/m.json")
