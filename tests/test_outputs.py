def test_the_reading_example_runs_as_written(produced: tuple[dict[str, Any], Any], tmp_path: Path, monkeypatch: Any) -> None:
    """docs/outputs.md's Python, run on a shard the worker wrote, in the folder it was saved to."""
    import pyarrow.parquet as pq

    (example,) = re.findall(r"```python\n(.*?)```", OUTPUTS.read_text(), re.DOTALL)
    shard = produced[1]
    pq.write_table(shard, tmp_path / "shard-00000.parquet")
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {}
    exec(example, names)  # noqa: S102 -- the document's own example, the point of the test
    assert names["vectors"].shape == (len(shard), shard.schema.field("vector").type.list_size)
    assert names["failed"] == json.loads(shard.schema.metadata[keys.SHARD_FAILED_METADATA])
