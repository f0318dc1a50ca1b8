from __future__ import annotations

import pytest

from clip_shared import keys
from tests.support import AWKWARD_KEYS


def test_keys_keep_the_source_key_verbatim_and_are_deterministic() -> None:
    key = keys.vector_key("out/", "ViT-B-32__openai", "in-bucket", "photos/a b/café.jpg")
    assert key == "out/vectors/ViT-B-32__openai/in-bucket/photos/a b/café.jpg.json"
    assert keys.document_key("out", "m", "b", "k") == "out/documents/m/b/k.json"
    assert keys.parquet_key("", "m", "man-1", 3) == "parquet/m/man-1/shard-00003.parquet"
    assert keys.events_key("out", "m", "man-1", 3) == "out/events/m/man-1/shard-00003.json"
    assert keys.manifest_prefix("out", "man-1") + keys.manifest_shard_name(3) == "out/manifests/man-1/shard-00003.json"


def test_different_inputs_never_share_an_output_even_when_keys_are_too_long_for_s3() -> None:
    long_a, long_b = "a" * 1100, "a" * 1099 + "b"
    outputs = {
        keys.vector_key("", "m", bucket, key) for bucket, key in [("b1", long_a), ("b1", long_b), ("b2", long_a), ("b1", "x")]
    }
    assert len(outputs) == 4
    assert all(len(output.encode()) <= keys.MAX_KEY_BYTES for output in outputs)


def test_model_id_is_one_path_segment() -> None:
    assert keys.model_id("hf-hub:timm/ViT-B-16-SigLIP", "none") == "hf-hub-timm-ViT-B-16-SigLIP__random"


@pytest.mark.parametrize("url", ["https://b/k", "s3://bucket", "s3:///k", "bucket/key"])
def test_parse_s3_url_names_what_is_wrong(url: str) -> None:
    with pytest.raises(ValueError, match="is not an s3://bucket/key URL"):
        keys.parse_s3_url(url)


@pytest.mark.parametrize("key", [*AWKWARD_KEYS, "report#draft.jpg", "a?b#c;d", "//", " ", "x/"])
def test_a_url_maps_back_to_its_key_byte_for_byte(key: str) -> None:
    assert keys.parse_s3_url(keys.s3_url("bucket", key)) == ("bucket", key)
