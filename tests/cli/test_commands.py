"""backfill, search, similar, embed-text and status against template.yaml deployed in the emulator."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from typer.testing import CliRunner

from clip_pipeline import local
from clip_pipeline.app import app
from clip_pipeline.stack import Clients, Stack
from clip_shared import keys
from clip_store import StorageSettings, VectorStore, ingest_shards, store_uri
from clip_worker.model import load
from clip_worker.writer import shard_schema
from tests.support import TINY_MODEL, encode, photo

runner = CliRunner()


def invoke(deployed: tuple[Clients, Stack], *args: str) -> Any:
    clients, stack = deployed
    result = runner.invoke(app, [*args, "--stack-name", stack.name, "--endpoint-url", clients.endpoint_url or "", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_backfill_submits_the_right_array_job_once_and_nothing_the_second_time(
    deployed: tuple[Clients, Stack], tiny_config: Path
) -> None:
    clients, stack = deployed
    s3, batch = clients.client("s3"), clients.client("batch")
    bucket = stack.output("InputBucketName")
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"old/img-{i}.png", Body=encode(photo().rotate(i), "PNG"))
    s3.put_object(Bucket=bucket, Key="old/notes.txt", Body=b"not an image")

    first = invoke(deployed, "backfill", f"s3://{bucket}/old/")
    assert (first["listed"], first["submitted"], first["rejected"], first["jobs"]) == (6, 5, 1, 1)
    jobs = [
        j
        for j in batch.list_jobs(jobQueue=stack.output("JobQueueArn"), jobStatus="SUCCEEDED")["jobSummaryList"]
        if ":" not in j["jobId"]
    ]
    assert len(jobs) == 1
    job = batch.describe_jobs(jobs=[jobs[0]["jobId"]])["jobs"][0]
    assert job["arrayProperties"]["size"] == 3  # 5 objects in shards of SHARD_SIZE=2
    assert job["jobDefinition"] == stack.output("JobDefinitionArn")
    manifest_uri = next(e["value"] for e in job["container"]["environment"] if e["name"] == "MANIFEST_URI")
    output, prefix = keys.parse_s3_url(manifest_uri)
    children = [
        json.loads(s3.get_object(Bucket=output, Key=prefix + keys.manifest_shard_name(i))["Body"].read()) for i in range(3)
    ]
    assert [len(child["entries"]) for child in children] == [2, 2, 1]
    assert sorted(e["key"] for child in children for e in child["entries"]) == [f"old/img-{i}.png" for i in range(5)]

    # The job runs (the worker, as Batch would run it); then there is nothing left to backfill.
    runs = local.BatchRunner(clients, stack, {"CLIP_MODEL_CONFIG": str(tiny_config)}).run_pending()
    assert [run.exit_code for run in runs] == [0, 0, 0]
    second = invoke(deployed, "backfill", f"s3://{bucket}/old/")
    assert (second["submitted"], second["jobs"], second["already_embedded"], second["rejected"]) == (0, 0, 5, 1)


def write_shard(deployed: tuple[Clients, Stack], model_id: str, vectors: dict[str, np.ndarray]) -> None:
    clients, stack = deployed
    dimensions = len(next(iter(vectors.values())))
    table = pa.table(
        {
            "url": list(vectors),
            "bucket": ["b"] * len(vectors),
            "key": list(vectors),
            "version_id": [None] * len(vectors),
            "etag": ["e"] * len(vectors),
            "last_modified": [None] * len(vectors),
            "model": [TINY_MODEL] * len(vectors),
            "pretrained": ["p"] * len(vectors),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack(list(vectors.values())).astype(np.float32).reshape(-1)), dimensions
            ),
        },
        schema=shard_schema(dimensions),
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    bucket, key = stack.output("OutputBucketName"), keys.parquet_key("", model_id, "m-search", 0)
    s3 = clients.client("s3")
    s3.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    # What the indexer does when the shard lands; search reads the store, never the shards.
    store = VectorStore(store_uri(bucket, "", model_id), settings=StorageSettings(endpoint=clients.endpoint_url))
    ingest_shards(store, s3, [f"s3://{bucket}/{key}"])


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_index_submits_the_training_the_indexer_left_once_or_does_it_here_and_shows_the_recall(
    deployed: tuple[Clients, Stack],
) -> None:
    clients, stack = deployed
    model_id = "index-test__random"
    rng = np.random.default_rng(8)
    # Past IndexPolicy.exact_below: a build is due, which the indexer leaves past IndexMaxTrainRows.
    write_shard(deployed, model_id, {f"s3://in/{i:05d}.jpg": unit(rng.normal(size=16)) for i in range(10_000)})

    def mine(results: list[dict[str, Any]]) -> dict[str, Any]:
        return next(result for result in results if result["model_id"] == model_id)

    planned = mine(invoke(deployed, "index", "--dry-run"))
    assert (planned["due"], planned["done"], planned["job"], planned["rows"], planned["index"]) == (
        "build",
        "none",
        "",
        10_000,
        "none (exact search)",
    )

    # By default the stack's index job does it, on the stack's CPU queue; asked again, nothing more is submitted.
    submitted = mine(invoke(deployed, "index"))
    batch = clients.client("batch")
    [job] = batch.describe_jobs(jobs=[submitted["job"]])["jobs"]
    assert job["jobQueue"] == stack.output("IndexJobQueueArn") != stack.output("JobQueueArn")
    assert job["jobDefinition"].split("/")[-1].split(":")[0] == stack.output("IndexJobDefinitionArn").split("/")[-1].split(":")[0]
    assert job["container"]["command"] == ["python", "-m", "clip_indexer.train", model_id]
    assert (submitted["done"], submitted["index"]) == ("none", "none (exact search)")
    assert mine(invoke(deployed, "index"))["job"].startswith("already submitted")

    built = mine(invoke(deployed, "index", "--here"))
    assert (built["due"], built["done"], built["index"], built["trained_rows"], built["unindexed_rows"]) == (
        "build",
        "build",
        "IVF_RQ",
        10_000,
        0,
    )
    # Measured on the store's own vectors, and shown with the settings its readers now use.
    assert set(built["recall"]) == {"images", "shifted", "blurred"} and built["recall_target_reached"] is not None
    assert built["search"].startswith("nprobes ") and "recall@10 images" in built["search"]
    again = mine(invoke(deployed, "index", "--here"))
    assert (again["due"], again["done"], again["trained_rows"], again["search"]) == ("none", "none", 10_000, built["search"])
    shown = invoke(deployed, "status")
    # The job submitted above, on the index queue: not among the workers' jobs.
    assert sum(shown["index_jobs"].values()) == 1
    status = shown["indexes"][model_id]
    assert (status["rows"], status["index"], status["search"], status["recall"]) == (
        10_000,
        "IVF_RQ",
        built["search"],
        built["recall"],
    )


def test_search_similar_and_embed_text_rank_by_the_vectors(
    deployed: tuple[Clients, Stack], tiny_config: Path, tiny_checkpoint: Path
) -> None:
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu", model_config_path=str(tiny_config))
    bicycle = model.embed_texts(["a red bicycle"])[0]
    rng = np.random.default_rng(7)
    others = {f"s3://in/other-{i}.jpg": unit(rng.normal(size=32)) for i in range(20)}
    near = unit(bicycle + 0.3 * unit(rng.normal(size=32)))
    write_shard(deployed, model.id, {**others, "s3://in/bicycle.jpg": bicycle, "s3://in/near-bicycle.jpg": near})

    config = ["--model-config", str(tiny_config)]
    found = invoke(deployed, "search", "a red bicycle", "--top", "3", *config)
    assert [match["url"] for match in found[:2]] == ["s3://in/bicycle.jpg", "s3://in/near-bicycle.jpg"]
    assert found[0]["score"] > 0.999 and len(found) == 3

    similar = invoke(deployed, "similar", "s3://in/bicycle.jpg", "--top", "1")
    assert [match["url"] for match in similar] == ["s3://in/near-bicycle.jpg"]

    clients, stack = deployed
    result = runner.invoke(
        app, ["embed-text", "a red bicycle", "--stack-name", stack.name, "--endpoint-url", clients.endpoint_url or "", *config]
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(json.loads(result.stdout), bicycle, atol=1e-6)


def test_unknown_stack_and_unembedded_image_fail_in_one_clear_line(deployed: tuple[Clients, Stack]) -> None:
    clients, stack = deployed
    result = runner.invoke(app, ["status", "--stack-name", "no-such-stack", "--endpoint-url", clients.endpoint_url or ""])
    assert result.exit_code == 2 and "cannot read stack no-such-stack" in result.output
    result = runner.invoke(
        app, ["backfill", "bucket-without-scheme", "--stack-name", stack.name, "--endpoint-url", clients.endpoint_url or ""]
    )
    assert result.exit_code == 2 and "is not an s3://bucket/prefix URL" in result.output


def test_serve_answers_with_the_deployed_query_functions_settings(deployed: tuple[Clients, Stack], tiny_config: Path) -> None:
    clients, stack = deployed
    command = [
        sys.executable, "-m", "clip_pipeline", "serve", "--stack-name", stack.name, "--endpoint-url", clients.endpoint_url or "",
        "--model-config", str(tiny_config), "--port", "0", "--json",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("{"), process.stderr.read() if process.stderr else ""
        url = json.loads(line)["url"]
        health = requests.get(f"{url}health", timeout=30).json()
        # The model and weights come from the query function's environment in the stack.
        assert (health["model"], health["pretrained"]) == (stack.model, stack.pretrained)
        refused = requests.post(f"{url}embed", json={"texts": ["x"] * 40}, timeout=30)
        assert (refused.status_code, refused.json()["error"]["limit"]) == (400, 32)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_serve_says_in_one_line_when_the_port_is_taken(deployed: tuple[Clients, Stack], tiny_config: Path) -> None:
    clients, stack = deployed
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(
            app,
            ["serve", "--stack-name", stack.name, "--endpoint-url", clients.endpoint_url or "", "--model-config", str(tiny_config),
             "--port", str(port)],
        )  # fmt: skip
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "--port 0" in result.output
