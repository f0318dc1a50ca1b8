"""What a million images cost: the local pipeline over N photos, every AWS request counted and priced.

`clip-pipeline local`'s own code runs (the real dispatcher handler, the real worker as Batch would
run it) against moto's server with its request recorder on; each recorded request is attributed
to the part of the pipeline that would make it on AWS, priced at us-east-1 list prices, and
divided by the number of images. Requests only the emulator needs (creating the stack, the local
runner's queue and job polling, the uploads themselves) are left out, and two costs the emulator
makes no request for are added from their definition: the SQS message S3's event notification
sends per upload, and the dispatcher Lambda's invocations. The GPU term comes from a throughput
given on the command line (docs/gpu.md), since no GPU runs here.

    python -m bench.cost_bench                                  # 100 JPEGs of about 30 KB
    python -m bench.cost_bench --images 1000 --json bench/out/cost.json
    python -m bench.cost_bench --gpu-images-per-second 400 --gpu-dollars-per-hour 0.526
    python -m bench.cost_bench --gpu-images-per-second 400 --lane auto     # trickles: the Lambda lane beside Batch

`--lane lambda|auto` prices the Lambda lane (issue 23) for the trickle table: a window of at most
`--lambda-max-images` accepted uploads (every window with `lambda`) is embedded by one invocation of
a `--lambda-memory-mb` function, priced from bench/lane_bench.py's figures for the model (its
recorded run, or `--lane-figures` of another) projected to that memory; bigger windows go to Batch.
Its requests are a job child's: the dispatcher's manifest PUT, an Invoke instead of SubmitJob, and
in the function a manifest GET, a GET per image, the shard and events PUTs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

from bench import lane_bench
from clip_shared import notifications

#: us-east-1 list prices, November 2026 (https://aws.amazon.com/s3/pricing/, /sqs/pricing/, /lambda/pricing/).
S3_WRITE = 0.005 / 1000  # PUT, COPY, POST, LIST
S3_READ = 0.0004 / 1000  # GET, HEAD and the rest; DELETE is free
SQS_REQUEST = 0.40 / 1_000_000  # a request carries up to 10 messages (64 KB chunks)
LAMBDA_REQUEST = 0.20 / 1_000_000
LAMBDA_GB_SECOND = 0.0000166667
#: Lambda gives a function one vCPU at 1,769 MB, in proportion below it.
LAMBDA_MB_PER_VCPU = 1769
#: The dispatcher's waits on AWS: first byte of a small ranged GET, a PUT, SubmitJob.
S3_GET_LATENCY_S = 0.025
S3_PUT_LATENCY_S = 0.05
SUBMIT_LATENCY_S = 0.1
#: The issue's target for everything but the GPU, at default settings.
TARGET_PER_MILLION = 1.50
#: Issue 23's targets for the Lambda lane with ViT-B-32: a 10-upload window, and the first vector
#: after the batching window closes on an idle stack (the function cold).
TARGET_LANE_WINDOW = 10
TARGET_LANE_PER_MILLION = 10.0
TARGET_LANE_LATENCY_S = 30.0
#: The dispatcher's Invoke of the lane function (an asynchronous invocation is queued at once).
INVOKE_LATENCY_S = 0.05
#: What a dispatcher batch costs whatever its size: the writes and reads of one job child (or one
#: invocation of the Lambda lane, which makes the same requests).
PER_BATCH_LINES = (
    ("dispatcher", "manifest files"),
    ("dispatcher", "job records"),
    ("worker", "manifest reads"),
    ("worker", "parquet/ writes"),
    ("worker", "events/ writes"),
)
JPEG_BYTES = 30_000


def function_memory_mb(logical_id: str) -> int:
    """A function's MemorySize, as template.yaml sets it."""
    from samtranslator.yaml_helper import yaml_parse

    template = yaml_parse((Path(__file__).resolve().parents[1] / "template.yaml").read_text())
    return int(template["Resources"][logical_id]["Properties"]["MemorySize"])


@dataclass(frozen=True)
class Line:
    component: str
    what: str
    kind: str
    requests: int
    per_image: float
    dollars_per_million: float


def photos(count: int, folder: Path) -> list[Path]:
    """`count` distinct JPEGs of about 30 KB, cut from scikit-image's photos."""
    from PIL import Image

    from bench.worker_bench import PHOTO_NAMES, PHOTOS

    sources = [Image.open(PHOTOS / name).convert("RGB") for name in PHOTO_NAMES]
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        angle = index // len(sources) * 7 % 360
        picture = source.rotate(angle, expand=False).resize((480, 360))
        quality = 90
        while True:
            buffer = io.BytesIO()
            picture.save(buffer, "JPEG", quality=quality)
            if buffer.tell() <= JPEG_BYTES * 1.1 or quality <= 40:
                break
            quality -= 5
        path = folder / f"photo-{index:05d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def _operation(entry: dict[str, Any]) -> tuple[str, str, str, str]:
    """(service, operation, bucket, key) of one recorded request."""
    headers = {name.lower(): value for name, value in entry["headers"].items()}
    target = headers.get("x-amz-target", "")
    body = base64.b64decode(entry["body"]) if entry.get("body_encoded") else (entry.get("body") or "").encode()
    url = urlparse(entry["url"])
    if "AmazonSQS" in target:
        queue = json.loads(body or b"{}").get("QueueUrl", "") if body.startswith(b"{") else ""
        return "sqs", target.rsplit(".", 1)[-1], queue.rsplit("/", 1)[-1], ""
    authorization = headers.get("authorization", "")
    service = authorization.split("/")[3] if authorization.count("/") >= 4 else ""
    if service != "s3":
        if b"Action=" in body:
            return service, dict(part.split("=", 1) for part in body.decode().split("&") if "=" in part).get("Action", ""), "", ""
        return service, url.path, "", ""
    bucket, _, key = unquote(url.path).lstrip("/").partition("/")
    method = entry["method"]
    query = url.query
    if method == "GET" and not key:
        # A listing's "key" is the prefix it lists, which says whose listing it is.
        return "s3", "ListObjects", bucket, unquote(dict(parse_qsl(url.query)).get("prefix", ""))
    if method == "GET":
        return "s3", "GetObject" + ("(range)" if "range" in headers else ""), bucket, key
    return (
        "s3",
        {"PUT": "PutObject", "HEAD": "HeadObject", "DELETE": "DeleteObject", "POST": "Post"}.get(method, method)
        + ("?" + query if query and method == "POST" else ""),
        bucket,
        key,
    )


def attribute(operation: tuple[str, str, str, str], input_bucket: str, output_bucket: str) -> tuple[str, str] | None:
    """(component, what) on AWS for a recorded request, or None for what only the emulator needs."""
    service, name, bucket, key = operation
    if service == "sqs":
        # The local pollers stand in for Lambda's event source mappings: their receives and deletes
        # are what AWS's pollers do (counted from the deletes, below); queue attributes are the runner's.
        if name != "DeleteMessageBatch":
            return None
        return ("lambda poller", "indexer queue" if "Indexer" in bucket else "upload queue")
    if service != "s3":
        return None
    if bucket == input_bucket:
        if name == "GetObject(range)":
            return "dispatcher", "first bytes of each upload"
        if name == "GetObject":
            return "worker", "download of each image"
        if name == "HeadObject":
            return "indexer", "is a removed upload back?"
        return None  # the uploads: the user's own requests
    if bucket != output_bucket:
        return None
    top = key.split("/", 1)[0]
    if top in ("store", "tombstones"):
        return "indexer", f"vector store {name.split('?')[0]}"
    if top == "parquet" and name.startswith("GetObject"):
        return "indexer", "shard reads"
    if name == "PutObject":
        return {
            "manifests": ("dispatcher", "manifest files"),
            "jobs": ("dispatcher", "job records"),
            "rejected": ("dispatcher", "rejection records"),
        }.get(top, ("worker", f"{top}/ writes"))
    if name.startswith("GetObject") or name == "HeadObject":
        return ("worker", "manifest reads") if top == "manifests" else ("worker", f"{top}/ reads")
    if name == "ListObjects":
        return "worker", "listings"
    return None


def price(name: str) -> float:
    return (
        S3_WRITE
        if name in ("PutObject", "ListObjects") or name.startswith("Post")
        else 0.0
        if name == "DeleteObject"
        else S3_READ
    )


def measure(count: int, model: str, pretrained: str, model_config: str | None, shard_size: int) -> dict[str, Any]:
    import requests
    from rich.console import Console

    from clip_pipeline import local
    from clip_pipeline.progress import Reporter

    parameters = {
        "ClipModel": model,
        "ClipPretrained": pretrained,
        "ShardSize": str(shard_size),
        "MaximumBatchingWindowInSeconds": "2",
    }
    with tempfile.TemporaryDirectory() as scratch, local.emulated_stack(parameters) as (clients, stack):
        files = photos(count, Path(scratch))
        requests.post(f"{clients.endpoint_url}/moto-api/recorder/reset-recording", timeout=10)
        requests.post(f"{clients.endpoint_url}/moto-api/recorder/start-recording", timeout=10)
        extra = {"CLIP_MODEL_CONFIG": model_config} if model_config else {}
        started = time.monotonic()
        with Reporter(Console(stderr=True), json_lines=True).shown() as reporter:
            run = local.run_pipeline(clients, stack, Path(scratch), files, reporter, extra, lambda line: None)
        requests.post(f"{clients.endpoint_url}/moto-api/recorder/stop-recording", timeout=10)
        elapsed = time.monotonic() - started
        recording = requests.get(f"{clients.endpoint_url}/moto-api/recorder/download-recording", timeout=60).text
        entries = [json.loads(line) for line in recording.splitlines() if line.strip()]
        input_bucket, output_bucket = stack.output("InputBucketName"), stack.output("OutputBucketName")
    counts: Counter[tuple[str, str, str]] = Counter()
    for entry in entries:
        operation = _operation(entry)
        attributed = attribute(operation, input_bucket, output_bucket)
        if attributed is not None:
            counts[(*attributed, operation[1])] += 1
    return {
        "images": count,
        "seconds": round(elapsed, 1),
        "job_runs": len(run.runs),
        "counts": counts,
        "indexer_invocations": len(run.indexer_invocations),
        "indexer_seconds": round(sum(invocation.seconds for invocation in run.indexer_invocations), 3),
        "dispatcher_invocations": len(run.invocations),
        "dispatcher_seconds": round(sum(invocation.seconds for invocation in run.invocations), 3),
        "dispatcher_cpu_seconds_per_invocation": round(
            dispatcher_cpu_per_invocation(round(count / max(1, len(run.invocations)))), 4
        ),
        "recorded_requests": len(entries),
    }


def sqs_event(bucket: str, objects: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    """An SQS batch for Lambda: one message per (key, eTag, versionId), each holding S3's notification."""
    records = []
    for index, (key, etag, version_id) in enumerate(objects):
        notification = notifications.object_created(bucket, key, 30000, etag, version_id, sender="cost-bench")
        records.append(
            {
                "messageId": str(index),
                "receiptHandle": "h",
                "body": json.dumps({"Records": [notification]}),
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "0",
                    "SenderId": "s",
                    "ApproximateFirstReceiveTimestamp": "0",
                },
                "messageAttributes": {},
                "md5OfBody": "m",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:1:q",
                "awsRegion": "us-east-1",
            }
        )
    return {"Records": records}


def dispatcher_cpu_per_invocation(records: int, repeats: int = 5) -> float:
    """CPU seconds the real dispatcher handler spends on one SQS batch of `records` uploads, with every
    S3 and Batch answer canned (no emulator in the process), so the time is the function's own."""
    from botocore.awsrequest import AWSResponse
    from moto.core.botocore_stubber import MockRawResponse as Canned

    from bench.worker_bench import PHOTO_NAMES, PHOTOS
    from clip_pipeline import local

    head = (PHOTOS / PHOTO_NAMES[3]).read_bytes()[:262]  # rocket.jpg: a JPEG's first bytes

    def answer(request: Any, event_name: str, **_: Any) -> AWSResponse:
        operation = event_name.rsplit(".", 1)[-1]
        if operation == "GetObject":
            headers = {
                "Content-Range": "bytes 0-261/30000",
                "ETag": '"0123456789abcdef0123456789abcdef"',
                "x-amz-version-id": "v1",
                "Content-Length": "262",
                "Content-Type": "image/jpeg",
            }
            return AWSResponse(request.url, 206, headers, Canned(head))
        if operation == "SubmitJob":
            body = json.dumps({"jobId": "j", "jobName": "n", "jobArn": "arn:aws:batch:us-east-1:1:job/j"}).encode()
            return AWSResponse(request.url, 200, {"Content-Type": "application/json"}, Canned(body))
        return AWSResponse(request.url, 200, {"ETag": '"e"'}, Canned(b""))

    environment = {
        "OUTPUT_BUCKET": "out-bucket",
        "OUTPUT_PREFIX": "",
        "JOB_QUEUE": "q",
        "JOB_DEFINITION": "d",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_NAMESPACE": "Bench",
        "AWS_ENDPOINT_URL": "",
    }
    saved = dict(os.environ)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            handler = local.load_handler(local.DISPATCHER, environment)
        module = sys.modules[handler.__module__]
        for client in (module.s3, module.batch_client):
            client.meta.events.register_first("before-send", answer)
        event = sqs_event(
            "in-bucket", [(f"photo-{index}.jpg", "0123456789abcdef0123456789abcdef", "v1") for index in range(records)]
        )
        timings = []
        for _ in range(repeats + 1):
            started = time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                response = handler(event, local.LambdaContext("bench", 300))
            timings.append(time.process_time() - started)
            assert response == {"batchItemFailures": []}, response
        return min(timings[1:])  # warm: Lambda reuses its environment across invocations
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cost_table(measured: dict[str, Any], gpu_images_per_s: float, gpu_dollars_per_hour: float, memory_mb: int) -> list[Line]:
    from clip_dispatch.admission import ADMISSION_THREADS

    images = measured["images"]
    lines = []
    for (component, what, name), requests in sorted(measured["counts"].items()):
        if component == "lambda poller":
            # Each delete batch follows one receive that returned messages: two SQS requests.
            lines.append(
                Line(
                    "indexer" if what == "indexer queue" else "SQS (Lambda's poller)",
                    f"{what}: receive + delete, up to 10 messages each",
                    "SQS",
                    2 * requests,
                    2 * requests / images,
                    2 * requests * SQS_REQUEST / images * 1e6,
                )
            )
            continue
        unit = price(name)
        lines.append(Line(component, what, name, requests, requests / images, requests * unit / images * 1e6))
    lines.append(Line("SQS (S3 notification)", "one message per upload, sent by S3", "SQS", images, 1.0, SQS_REQUEST * 1e6))
    shards = sum(count for (component, what, name), count in measured["counts"].items() if what == "parquet/ writes")
    lines.append(
        Line(
            "indexer",
            "one message per finished shard, sent by S3",
            "SQS",
            shards,
            shards / images,
            shards * SQS_REQUEST / images * 1e6,
        )
    )
    indexer_invocations, indexer_memory_mb = measured["indexer_invocations"], function_memory_mb("IndexerFunction")
    # Measured here against the emulator: a stand-in for Lambda's duration at the function's memory.
    indexer_dollars = (
        indexer_invocations * LAMBDA_REQUEST + measured["indexer_seconds"] * indexer_memory_mb / 1024 * LAMBDA_GB_SECOND
    )
    lines.append(
        Line(
            "indexer",
            f"Lambda: {indexer_invocations} invocations, {measured['indexer_seconds']:.2f} s at {indexer_memory_mb} MB",
            "Lambda",
            indexer_invocations,
            indexer_invocations / images,
            indexer_dollars / images * 1e6,
        )
    )
    invocations = measured["dispatcher_invocations"]
    # Lambda gives a function memory/1769 of a vCPU, so the handler's own CPU time stretches by that
    # much; on top come its waits on S3 and Batch, with AWS's usual latencies (the module's constants).
    cpu_share = min(1.0, memory_mb / LAMBDA_MB_PER_VCPU)
    waits = invocations * (
        math.ceil(images / invocations / ADMISSION_THREADS) * S3_GET_LATENCY_S + S3_PUT_LATENCY_S + SUBMIT_LATENCY_S
    )
    billed_s = measured["dispatcher_cpu_seconds_per_invocation"] * invocations / cpu_share + waits
    dollars = invocations * LAMBDA_REQUEST + billed_s * memory_mb / 1024 * LAMBDA_GB_SECOND
    lines.append(
        Line(
            "dispatcher",
            f"Lambda: {invocations} invocations, {billed_s:.2f} s billed at {memory_mb} MB",
            "Lambda",
            invocations,
            invocations / images,
            dollars / images * 1e6,
        )
    )
    if gpu_images_per_s > 0:
        lines.append(
            Line(
                "GPU",
                f"{gpu_dollars_per_hour}/h at {gpu_images_per_s:g} images/s",
                "EC2",
                0,
                0.0,
                gpu_dollars_per_hour / 3600 / gpu_images_per_s * 1e6,
            )
        )
    return lines


@dataclass(frozen=True)
class ColdStart:
    """What a batch window pays when no GPU instance is running: a model, not a measurement (no GPU here).

    Batch launches an instance (boot and ECS registration), pulls the worker image (about 4 GB
    compressed, most of it CUDA torch), loads the model, embeds, and keeps the idle instance until it
    scales in; EC2 bills all of it by the second.
    """

    boot_s: float = 150.0
    pull_s: float = 90.0
    load_s: float = 20.0
    idle_tail_s: float = 300.0

    @property
    def seconds(self) -> float:
        return self.boot_s + self.pull_s + self.load_s + self.idle_tail_s


@dataclass(frozen=True)
class Split:
    """The pipeline's dollars (everything but the GPU and the lane's compute): what each image pays,
    and what each dispatcher batch pays whatever its size (PER_BATCH_LINES)."""

    per_image: float
    per_batch: float

    @classmethod
    def of(cls, lines: list[Line], images: int) -> Split:
        pipeline = [line for line in lines if line.component not in ("GPU", "indexer")]
        batch_lines = [line for line in pipeline if (line.component, line.what) in PER_BATCH_LINES]
        batches = max(1, sum(line.requests for line in batch_lines if line.what == "manifest files"))
        per_batch = sum(line.dollars_per_million for line in batch_lines) * images / 1e6 / batches
        per_image = sum(line.dollars_per_million for line in pipeline if line not in batch_lines) / 1e6
        return cls(per_image, per_batch)

    def window(self, n: int, batches: int = 1) -> float:
        return n * self.per_image + batches * self.per_batch


def dispatcher_seconds_per_image(measured: dict[str, Any], memory_mb: int) -> float:
    """The dispatcher's seconds per upload on Lambda: its measured CPU at its share of a vCPU, and
    its ranged GETs overlapped on the admission threads (docs/scale.md, "The dispatcher, measured")."""
    from clip_dispatch.admission import ADMISSION_THREADS

    records = max(1, round(measured["images"] / max(1, measured["dispatcher_invocations"])))
    cpu_share = min(1.0, memory_mb / LAMBDA_MB_PER_VCPU)
    return measured["dispatcher_cpu_seconds_per_invocation"] / records / cpu_share + S3_GET_LATENCY_S / ADMISSION_THREADS


@dataclass(frozen=True)
class LaneWindow:
    """One window's invocation of the Lambda lane: seconds billed, dollars, and the time from the
    window's close to its vectors written."""

    images: int
    invocations: int
    cold: bool
    seconds: float
    dollars: float
    latency_s: float


def lane_window(n: int, cold: bool, projection: lane_bench.Projection, dispatcher_s_per_image: float) -> LaneWindow:
    """The lane embedding a window of `n` images, in invocations of at most what one embeds in 5
    minutes (a third of Lambda's 15), side by side. Each pays the model's projected seconds per
    image, a GET of its manifest and of its first image before the work overlaps the rest, the
    shard's and the events' PUTs, and when the function was idle its INIT and first call."""
    invocations = math.ceil(n / max(1, projection.images_in_5_min))
    fixed = 2 * S3_GET_LATENCY_S + 2 * S3_PUT_LATENCY_S + ((projection.init_s + projection.first_call_extra_s) if cold else 0.0)
    seconds = invocations * fixed + n * projection.seconds_per_image
    dollars = invocations * LAMBDA_REQUEST + seconds * projection.memory_mb / 1024 * LAMBDA_GB_SECOND
    # Before the function: the dispatcher admits the window (its measured rate) and writes the manifests.
    dispatcher_s = n * dispatcher_s_per_image + S3_PUT_LATENCY_S + INVOKE_LATENCY_S
    slowest = fixed + math.ceil(n / invocations) * projection.seconds_per_image
    return LaneWindow(n, invocations, cold, round(seconds, 3), dollars, round(dispatcher_s + slowest, 2))


@dataclass(frozen=True)
class TrickleRow:
    """$ per million images when every batch window holds `images` uploads."""

    images: int
    #: The Batch lane, each window finding the GPUs at zero (None without a GPU throughput).
    batch: float | None
    #: The lane `--lane` picks for this window (batch or lambda) and its $ per million: with windows
    #: every batching window (the function stays warm), and an isolated window (the function cold).
    lane: str
    warm: float | None
    cold: float | None
    cold_latency_s: float | None


def trickle(
    per_window: list[int],
    split: Split,
    gpu_images_per_s: float,
    gpu_dollars_per_hour: float,
    cold: ColdStart,
    lane: str = "batch",
    projection: lane_bench.Projection | None = None,
    max_images: int = 100,
    dispatcher_s_per_image: float = 0.0,
) -> list[TrickleRow]:
    """Each window of `n` uploads: on Batch finding the GPUs at zero, and on the lane `lane` picks."""
    rows = []
    for n in per_window:
        batch = None
        if gpu_images_per_s > 0:
            gpu_s = cold.seconds + n / gpu_images_per_s
            batch = (split.window(n) + gpu_s * gpu_dollars_per_hour / 3600) / n * 1e6
        if lane == "lambda" or (lane == "auto" and n <= max_images):
            if projection is None:
                raise ValueError("the Lambda lane needs the model's projection (lane_bench)")
            warm, isolated = (lane_window(n, is_cold, projection, dispatcher_s_per_image) for is_cold in (False, True))
            rows.append(
                TrickleRow(
                    n,
                    batch,
                    "lambda",
                    (split.window(n, warm.invocations) + warm.dollars) / n * 1e6,
                    (split.window(n, isolated.invocations) + isolated.dollars) / n * 1e6,
                    isolated.latency_s,
                )
            )
        else:
            rows.append(TrickleRow(n, batch, "batch", batch, batch, None))
    return rows


def lane_figures(model: str, path: Path | None) -> lane_bench.Figures:
    """The model's figures from a lane_bench JSON file, or from its recorded run."""
    if path is not None:
        found = [row for row in json.loads(path.read_text())["figures"] if row["model"] == model]
        if not found:
            raise SystemExit(f"{path} has no figures for {model}")
        return lane_bench.Figures(**found[0])
    if model not in lane_bench.RECORDED:
        raise SystemExit(
            f"no recorded lane figures for {model}: run `python -m bench.lane_bench --models {model} --json F` and pass --lane-figures F"
        )
    return lane_bench.RECORDED[model]


def print_trickle(
    rows: list[TrickleRow],
    args: argparse.Namespace,
    split: Split,
    cold: ColdStart,
    projection: lane_bench.Projection | None,
    steady: float | None,
) -> None:
    print(
        f"\ntrickle: $ per million images when each batch window holds n uploads (the pipeline's requests: "
        f"${split.per_image * 1e6:.3f} per million images + ${split.per_batch:.7f} a batch; the vector store's commits not counted)"
    )
    if args.gpu_images_per_second > 0:
        print(
            f"  batch: each window finds the GPUs at zero ({cold.boot_s:g} s boot, {cold.pull_s:g} s image pull, "
            f"{cold.load_s:g} s model load, {cold.idle_tail_s:g} s idle before scale-in: a model, not a measurement)"
        )
    if projection is not None:
        print(
            f"  {args.lane}: windows of at most {args.lambda_max_images if args.lane == 'auto' else 'any number of'} uploads go to "
            f"the Lambda lane, {args.model} at {projection.memory_mb} MB ({projection.vcpus} vCPUs): "
            f"{projection.seconds_per_image:.4f} s an image, INIT {projection.init_s:.1f} s + first call "
            f"{projection.first_call_extra_s:.1f} s (projected from bench.lane_bench's measurements); warm: a window every "
            f"batching window keeps the function warm; cold: an isolated window finds it idle"
        )
        if not projection.fits:
            print(
                f"  NOTE: the function's processes peaked above {projection.memory_mb} MB in bench.lane_bench's cold start "
                "(docs/benchmarks.md, 'Lambda lane', says why and what would bring it under)"
            )
    print(f"  {'uploads':>8} {'batch, cold GPU':>16}   {'lane':<7} {'warm':>10} {'cold':>10} {'cold: vector after (s)':>22}")
    for row in rows:
        money = [f"{value:>10,.2f}" if value is not None else f"{'-':>10}" for value in (row.warm, row.cold)]
        batch = f"{row.batch:>16,.2f}" if row.batch is not None else f"{'-':>16}"
        latency = f"{row.cold_latency_s:>22.1f}" if row.cold_latency_s is not None else f"{'-':>22}"
        print(f"  {row.images:>8} {batch}   {row.lane:<7} {money[0]} {money[1]} {latency}")
    if steady is not None:
        print(f"  {'steady':>8} {steady:>16,.2f}   (an instance always busy: a steady stream of windows above the threshold)")
    if projection is not None and args.model == "ViT-B-32":
        target = next((row for row in rows if row.images == TARGET_LANE_WINDOW and row.lane == "lambda"), None)
        if target is not None and target.warm is not None and target.cold is not None and target.cold_latency_s is not None:
            for text, value, limit in (
                (f"{TARGET_LANE_WINDOW}-upload window, function warm", target.warm, TARGET_LANE_PER_MILLION),
                (f"{TARGET_LANE_WINDOW}-upload window, function cold", target.cold, TARGET_LANE_PER_MILLION),
            ):
                print(f"  {'met' if value <= limit else 'MISSED':<6} {text}: ${value:,.2f} per million (target <= ${limit:g})")
            verdict = "met" if target.cold_latency_s <= TARGET_LANE_LATENCY_S else "MISSED"
            print(
                f"  {verdict:<6} vector {target.cold_latency_s:.1f} s after the window closes on an idle stack "
                f"(target <= {TARGET_LANE_LATENCY_S:g} s; the dispatcher's own cold start and the image's fetch not counted)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--pretrained", default="none", help="weights for the worker; `none` (random) is enough to count requests"
    )
    parser.add_argument("--model-config", default=None)
    parser.add_argument("--shard-size", type=int, default=1000, help="the ShardSize parameter (default: the template's)")
    parser.add_argument("--gpu-images-per-second", type=float, default=0.0, help="measured GPU throughput; 0 leaves the GPU out")
    parser.add_argument("--gpu-dollars-per-hour", type=float, default=0.526, help="g4dn.xlarge on demand, us-east-1")
    parser.add_argument("--dispatcher-memory-mb", type=int, default=256, help="the dispatcher's MemorySize in template.yaml")
    parser.add_argument(
        "--trickle",
        type=int,
        nargs="*",
        default=[10, 100, 1000],
        help="uploads per batch window for the cold-start model (needs --gpu-images-per-second)",
    )
    parser.add_argument(
        "--lane",
        choices=("batch", "lambda", "auto"),
        default="batch",
        help="the trickle's embedding lane: Batch (today), the Lambda lane, or the lane by window size",
    )
    parser.add_argument("--lambda-memory-mb", type=int, default=3008, help="the lane function's MemorySize")
    parser.add_argument(
        "--lambda-max-images", type=int, default=100, help="with --lane auto, the largest window the Lambda lane takes"
    )
    parser.add_argument(
        "--lane-figures", type=Path, default=None, help="a bench.lane_bench JSON for --model (default: its recorded run)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    projection = (
        lane_bench.project(lane_figures(args.model, args.lane_figures), args.lambda_memory_mb) if args.lane != "batch" else None
    )

    warnings.filterwarnings("ignore")
    measured = measure(args.images, args.model, args.pretrained, args.model_config, args.shard_size)
    lines = cost_table(measured, args.gpu_images_per_second, args.gpu_dollars_per_hour, args.dispatcher_memory_mb)
    store = sum(line.dollars_per_million for line in lines if line.component == "indexer")
    without_gpu = sum(line.dollars_per_million for line in lines if line.component not in ("GPU", "indexer"))
    total = sum(line.dollars_per_million for line in lines)
    print(
        f"{measured['images']} JPEGs of about {JPEG_BYTES // 1000} KB through the local pipeline in {measured['seconds']} s "
        f"({measured['job_runs']} job runs, {measured['recorded_requests']} requests recorded)"
    )
    print(f"{'component':<22} {'what':<46} {'request':<17} {'count':>6} {'per image':>10} {'$/million':>10}")
    for line in lines:
        print(
            f"{line.component:<22} {line.what:<46} {line.kind:<17} {line.requests:>6} {line.per_image:>10.4f} {line.dollars_per_million:>10.3f}"
        )
    verdict = "met" if without_gpu <= TARGET_PER_MILLION else "MISSED"
    print(
        f"\nembedding, everything but the GPU: ${without_gpu:.3f} per million images ({verdict}: target <= ${TARGET_PER_MILLION:.2f})"
    )
    print(f"the vector store (indexer):        ${store:.3f} per million images (falls with shards per invocation)")
    if args.gpu_images_per_second > 0:
        print(f"with the GPU:           ${total:.3f} per million images")
    cold = ColdStart()
    split = Split.of(lines, measured["images"])
    rows = []
    if args.gpu_images_per_second > 0 or projection is not None:
        rows = trickle(
            args.trickle,
            split,
            args.gpu_images_per_second,
            args.gpu_dollars_per_hour,
            cold,
            args.lane,
            projection,
            args.lambda_max_images,
            dispatcher_seconds_per_image(measured, args.dispatcher_memory_mb),
        )
        gpu = sum(line.dollars_per_million for line in lines if line.component == "GPU")
        print_trickle(rows, args, split, cold, projection, without_gpu + gpu if args.gpu_images_per_second > 0 else None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            **{k: v for k, v in measured.items() if k != "counts"},
            "lines": [asdict(line) for line in lines],
            "dollars_per_million_without_gpu": round(without_gpu, 4),
            "dollars_per_million_vector_store": round(store, 4),
            "dollars_per_million": round(total, 4),
            "split": asdict(split),
            "projection": asdict(projection) if projection else None,
            "trickle": [asdict(row) for row in rows],
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0 if without_gpu <= TARGET_PER_MILLION else 1


if __name__ == "__main__":
    # Where moto keeps the recording while it runs (it reads this when first imported); the bench reads
    # it back through moto's own recorder API.
    os.environ.setdefault("MOTO_RECORDER_FILEPATH", str(Path(tempfile.gettempdir()) / f"cost-bench-{os.getpid()}.jsonl"))
    sys.exit(main())
