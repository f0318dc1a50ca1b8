"""The dispatcher at scale: many synthetic upload notifications through the real handler, against moto.

Puts N small JPEG-headed objects into an emulated input bucket, then hands the real dispatcher
handler (functions/dispatcher/app.py) SQS batches of their notifications, BatchSize at a time, as
Lambda's poller would, and counts what it does: objects admitted per second per invocation, AWS
requests per object (by operation), jobs and array children per 1,000 objects. The worker is not
run. Timings are this machine's, against an in-process emulator: they rank settings, they are not
Lambda's latencies (docs/scale.md turns them into AWS figures).

    python -m bench.scale_bench                          # 100,000 notifications, BatchSize 1000
    python -m bench.scale_bench --notifications 2000 --batch-size 500
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from bench.cost_bench import sqs_event

STACK = "clip-scale"
#: A JPEG's first bytes are all the dispatcher reads; the rest of each object is never fetched.
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 300


def simulate(notifications: int, batch_size: int, shard_size: int) -> dict[str, Any]:
    """Loading the handler sets its environment in this process (as Lambda would), so it is put back after."""
    saved = dict(os.environ)
    try:
        return _simulate(notifications, batch_size, shard_size)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _simulate(notifications: int, batch_size: int, shard_size: int) -> dict[str, Any]:
    from moto import mock_aws

    from clip_pipeline import emulator, local
    from clip_pipeline.stack import Clients, function_environment, read_stack

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", emulator.REGION),
    ):
        os.environ[name] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)
    # moto in this process, the stack from template.yaml in it: the dispatcher's own settings and resources.
    with mock_aws(config={"batch": {"use_docker": False}, "lambda": {"use_docker": False}}):
        clients = Clients(None, emulator.REGION)
        emulator.deploy(
            clients, STACK, {"ImageUri": "local/clip-worker:dev", "ShardSize": str(shard_size), "BatchSize": str(batch_size)}
        )
        stack = read_stack(clients, STACK)
        functions = clients.client("lambda")
        dispatcher = stack.output("DispatcherFunctionName")
        for mapping in functions.list_event_source_mappings(FunctionName=dispatcher)["EventSourceMappings"]:
            functions.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)  # the bench invokes it
        environment = function_environment(clients, stack, "DispatcherFunctionName")
        environment |= {"POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "WARNING"}
        s3, batch = clients.client("s3"), clients.client("batch")
        input_bucket = stack.output("InputBucketName")
        started = time.monotonic()
        objects = []
        for index in range(notifications):
            key = f"uploads/{index // 1000:04d}/photo-{index:07d}.jpg"
            response = s3.put_object(Bucket=input_bucket, Key=key, Body=JPEG_HEAD)
            objects.append((key, response["ETag"].strip('"'), response.get("VersionId")))
        upload_s = time.monotonic() - started

        with contextlib.redirect_stdout(io.StringIO()):
            handler = local.load_handler(local.DISPATCHER, environment)
        module = sys.modules[handler.__module__]
        requests: Counter[str] = Counter()
        for client in (module.s3, module.batch_client):
            client.meta.events.register("before-call", lambda model, **_: requests.update([model.name]))

        invocations = []
        for start in range(0, notifications, batch_size):
            event = sqs_event(input_bucket, objects[start : start + batch_size])
            began = time.monotonic()
            with contextlib.redirect_stdout(io.StringIO()):
                response = handler(event, local.LambdaContext(dispatcher, 300))
            invocations.append((len(event["Records"]), time.monotonic() - began))
            if response["batchItemFailures"]:
                raise RuntimeError(f"the dispatcher failed {len(response['batchItemFailures'])} messages")
        jobs = [
            job
            for state in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")
            for job in batch.list_jobs(jobQueue=stack.output("JobQueueArn"), jobStatus=state)["jobSummaryList"]
            if ":" not in job["jobId"]
        ]
        children = sum(
            max(1, (batch.describe_jobs(jobs=[job["jobId"]])["jobs"][0].get("arrayProperties") or {}).get("size") or 1)
            for job in jobs
        )
    seconds = sum(duration for _, duration in invocations)
    return {
        "notifications": notifications,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "invocations": len(invocations),
        "objects_per_s_per_invocation": round(notifications / seconds, 1),
        "seconds_per_invocation": round(seconds / len(invocations), 3),
        "requests_per_object": {name: round(count / notifications, 4) for name, count in sorted(requests.items())},
        "jobs_per_1000_objects": round(1000 * len(jobs) / notifications, 2),
        "array_children_per_1000_objects": round(1000 * children / notifications, 2),
        "upload_seconds": round(upload_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000, help="the BatchSize parameter (SQS messages per invocation)")
    parser.add_argument("--shard-size", type=int, default=1000, help="the ShardSize parameter")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    result = simulate(args.notifications, args.batch_size, args.shard_size)
    print(f"{result['notifications']:,} notifications in {result['invocations']} invocations of up to {result['batch_size']}")
    print(f"  admitted per second per invocation  {result['objects_per_s_per_invocation']:,}")
    print(f"  seconds per invocation              {result['seconds_per_invocation']}")
    print(f"  jobs per 1,000 objects              {result['jobs_per_1000_objects']}")
    print(f"  array children per 1,000 objects    {result['array_children_per_1000_objects']}")
    for name, count in result["requests_per_object"].items():
        print(f"  {name:<34}  {count} per object")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
