"""docs/examples/: what the pipeline writes for an image it embeds, one it cannot, and one it
rejects, made by the dispatcher's and the worker's own code on an in-process emulator.

    python scripts/output_examples.py   # rewrites docs/examples/ (ViT-B-32, random weights: no download)

tests/test_outputs.py runs the same code with a tiny model and fails when the files' shape differs.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clip_dispatch.admission import ObjectRef, admit, record_rejection
from clip_shared import keys
from clip_shared.manifest import ManifestEntry, split
from clip_worker.config import WorkerConfig
from clip_worker.model import load
from clip_worker.runner import run

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
INPUT, OUTPUT = "photos-bucket", "embeddings-bucket"
MANIFEST_ID = "20261206T100000Z-5f0c3a9e2b71"
JOB_ID = "9f3c2a1e-4b6d-4e8a-9c1f-2d7b5e8a3c60"
#: The three outcomes' events, by file name.
EVENTS = ("document-created", "document-failed", "document-rejected")


def produce(s3: Any, config: WorkerConfig, image: bytes) -> tuple[dict[str, Any], pa.Table]:
    """The events and the shard for three uploads: a photo, a truncated JPEG, a text file named .jpg."""
    for bucket in (INPUT, OUTPUT):
        s3.create_bucket(Bucket=bucket)
    uploads = {"photos/cat.jpg": image, "photos/broken.jpg": image[: len(image) // 3], "photos/notes.jpg": b"milk, eggs"}
    entries: list[ManifestEntry] = []
    rejections = []
    for key, body in uploads.items():
        s3.put_object(Bucket=INPUT, Key=key, Body=body)
        admission = admit(s3, ObjectRef(INPUT, key), config.max_object_bytes)
        if admission.rejection is not None:
            rejections.append(record_rejection(s3, OUTPUT, "", admission.rejection, MANIFEST_ID))
        elif admission.entry is not None:
            entries.append(admission.entry)
    prefix = keys.manifest_prefix("", MANIFEST_ID)
    for manifest in split(MANIFEST_ID, entries, 1000):
        s3.put_object(Bucket=OUTPUT, Key=prefix + keys.manifest_shard_name(manifest.shard_index), Body=manifest.to_json())
    config = replace(config, manifest_uri=keys.s3_url(OUTPUT, prefix), output_bucket=OUTPUT, output_prefix="", job_id=JOB_ID)
    run(config, s3=s3)

    def read(key: str) -> bytes:
        return bytes(s3.get_object(Bucket=OUTPUT, Key=key)["Body"].read())

    model_id = load(config.model, config.pretrained, "cpu", model_config_path=config.model_config_path).id
    events = {event["type"]: event for event in json.loads(read(keys.events_key("", model_id, MANIFEST_ID, 0)))}
    (rejection,) = rejections
    events["document-rejected"] = json.loads(read(rejection))
    shard = pq.read_table(io.BytesIO(read(keys.parquet_key("", model_id, MANIFEST_ID, 0))))
    return events, shard


def main() -> None:
    from moto import mock_aws
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=90)
    config = WorkerConfig(
        manifest_uri="",
        output_bucket=OUTPUT,
        pretrained=keys.RANDOM_WEIGHTS,
        device="cpu",
        batch_size=4,
        io_threads=4,
        labels="a cat,a dog,a bicycle,a cup of coffee",
        keywords_top_k=2,
    )
    with mock_aws():
        import boto3

        events, shard = produce(boto3.client("s3", region_name="us-east-1"), config, buffer.getvalue())
    EXAMPLES.mkdir(exist_ok=True)
    for name in EVENTS:
        # Random weights stand in for `openai` (no download here); the shape is the same.
        text = json.dumps(events[name], indent=2) + "\n"
        text = text.replace("__random", "__openai").replace('"pretrained": "none"', '"pretrained": "openai"')
        (EXAMPLES / f"{name}.json").write_text(text)
    (EXAMPLES / "shard-schema.txt").write_text(shard.schema.to_string(show_schema_metadata=True) + "\n")


if __name__ == "__main__":
    main()
