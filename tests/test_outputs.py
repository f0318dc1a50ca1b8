"""The output contract consumers rely on (docs/outputs.md, docs/examples/) is what the code writes."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from clip_shared import events, keys
from clip_worker.writer import shard_schema
from scripts import output_examples
from tests.support import encode, photo, tiny_worker_config

OUTPUTS = Path(output_examples.__file__).resolve().parents[1] / "docs" / "outputs.md"


def shape(value: Any) -> Any:
    """The structure of a JSON value: its keys and the JSON type of every leaf (a list by its first item)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


@pytest.fixture(scope="module")
def produced(tiny_config: Path, tiny_checkpoint: Path) -> tuple[dict[str, Any], Any]:
    import boto3
    from moto import mock_aws

    config = replace(tiny_worker_config(tiny_config, tiny_checkpoint), labels="a cat,a dog,a bicycle", keywords_top_k=2)
    with pytest.MonkeyPatch.context() as patch, mock_aws():
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.setenv(name, "testing")
        # Module-scoped: it runs before the per-test environment fixture, so it sets its own.
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        return output_examples.produce(boto3.client("s3", region_name="us-east-1"), config, encode(photo(), "JPEG"))


@pytest.mark.parametrize("name", output_examples.EVENTS)
def test_each_example_event_has_the_shape_the_code_writes(produced: tuple[dict[str, Any], Any], name: str) -> None:
    example = json.loads((output_examples.EXAMPLES / f"{name}.json").read_text())
    written = produced[0][name]
    assert shape(example) == shape(written), "run `python scripts/output_examples.py`"
    for attribute in ("specversion", "type", "source", "datacontenttype", "dataschema"):
        assert example[attribute] == written[attribute]
    assert example.get("data", {}).get("error", {}).get("code") == written["data"].get("error", {}).get("code")


def test_every_outcome_names_the_same_chain_and_the_contract_version(produced: tuple[dict[str, Any], Any]) -> None:
    written = produced[0]
    assert {event["data"]["chainId"] for event in written.values()} == {output_examples.MANIFEST_ID}
    assert {event["dataschema"] for event in written.values()} == {events.DATASCHEMA}
    assert [written[name]["data"].get("jobId") for name in output_examples.EVENTS] == [
        output_examples.JOB_ID,
        output_examples.JOB_ID,
        None,  # rejected by the dispatcher: no job ever held it
    ]
    metadata = produced[1].schema.metadata
    assert metadata[keys.SHARD_SCHEMA_METADATA].decode() == events.SCHEMA_VERSION
    assert json.loads(metadata[keys.SHARD_FAILED_METADATA]) == [written["document-failed"]["subject"]]


def test_the_documented_parquet_schema_is_the_shard_s(produced: tuple[dict[str, Any], Any]) -> None:
    documented = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", OUTPUTS.read_text(), re.MULTILINE))
    written = produced[1].schema
    assert written.remove_metadata() == shard_schema(written.field("vector").type.list_size)
    assert {field.name: str(field.type) for field in written if field.name != "vector"} == {
        name: kind for name, kind in documented.items() if name != "vector"
    }
    assert documented["vector"] == "fixed_size_list<element: float>[dimensions]"
    example = (output_examples.EXAMPLES / "shard-schema.txt").read_text()
    for field in written:
        assert f"\n{field.name}: " in f"\n{example}", field.name
    for key in written.metadata:
        assert f"{key.decode()}" in OUTPUTS.read_text() and key.decode() in example


def test_the_reading_example_runs_as_written(
    produced: tuple[dict[str, Any], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/outputs.md's Python, run on a shard the worker wrote, in the folder it was saved to."""
    import pyarrow.parquet as pq

    (example,) = re.findall(r"```python\n(.*?)```", OUTPUTS.read_text(), re.DOTALL)
    shard = produced[1]
    pq.write_table(shard, tmp_path / "shard-00000.parquet")
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {}
    exec(example, names)  # the document's own example: running it is the point
    assert names["vectors"].shape == (len(shard), shard.schema.field("vector").type.list_size)
    assert names["failed"] == json.loads(shard.schema.metadata[keys.SHARD_FAILED_METADATA])


def test_the_documented_batch_counts_are_in_the_format_the_writer_writes() -> None:
    text = OUTPUTS.read_text()
    (documented,) = re.findall(r"```json\n(.*?)\n```", text, re.DOTALL)
    counts = events.BatchCounts.from_metadata({keys.EVENTS_OUTCOMES_METADATA: documented})
    assert counts is not None and counts.to_metadata() == {keys.EVENTS_OUTCOMES_METADATA: documented}
    assert f"`{keys.EVENTS_OUTCOMES_METADATA}`" in text
