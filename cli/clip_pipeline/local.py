"""What AWS does between the resources, done locally: Lambda's SQS poller and Batch's job runs.

The dispatcher handler (and the indexer's, and the embedding function's when the stack has a Lambda
lane) is invoked in this process with its function's resolved environment, as Lambda's SQS poller
would invoke it (batch size and batching window from the event source mapping, partial batch
failures honoured; a message a function fails goes on to its queue's dead-letter queue as SQS's
redrive policy says). Each submitted Batch job runs its job definition's
command in a child process, with the definition's environment, the job's overrides and, for
every array child, AWS_BATCH_JOB_ARRAY_INDEX, as Batch would run the container; an attempt that
exits as the retry strategy says to retry runs again, with AWS_BATCH_JOB_ATTEMPT counting up.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from clip_pipeline import emulator, jobs
from clip_pipeline.emulator import REPOSITORY
from clip_pipeline.progress import Reporter
from clip_pipeline.stack import Clients, Stack, plain_environment, read_stack
from clip_shared import keys
from clip_shared.lane import LaneRequest

DISPATCHER = REPOSITORY / "functions" / "dispatcher" / "app.py"
INDEXER = REPOSITORY / "functions" / "indexer" / "clip_indexer" / "app.py"
EMBEDDER = REPOSITORY / "functions" / "embedder" / "clip_embedder" / "app.py"
#: Locally nobody waits for a batch to fill: the longest window the pollers honour.
LOCAL_WINDOW_S = 2
LOCAL_STACK = "clip-local"
# Lambda runs one invocation per poll of up to 10 messages when no batching window is set.
_RECEIVE_MAX = 10


@contextlib.contextmanager
def emulated_stack(parameters: dict[str, str]) -> Iterator[tuple[Clients, Stack]]:
    """The emulator with template.yaml deployed in it; everything in this process talks to it meanwhile,
    and nothing after it (the environment it sets is put back when it stops)."""
    defaults = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": emulator.REGION}
    credentials = {name: os.environ.get(name) or value for name, value in defaults.items()}
    with function_environment(credentials), emulator.running() as clients:
        # The dispatcher's clients included: they are made when its module is loaded, in this process.
        with function_environment({"AWS_ENDPOINT_URL": clients.endpoint_url or ""}):
            emulator.deploy(clients, LOCAL_STACK, {"ImageUri": "local/clip-worker:dev", **parameters})
            yield clients, read_stack(clients, LOCAL_STACK)


@contextlib.contextmanager
def captured_logs(path: Path | None) -> Iterator[TextIO | None]:
    """Library logs and warnings into the file at `path`, which the caller hands on for the
    functions' and the worker's output; with None, all of it goes to stderr as it comes."""
    if path is None:
        yield None
        return
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with path.open("a", encoding="utf-8") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers, root.level = [handler], logging.INFO
        logging.captureWarnings(True)
        try:
            yield log
        finally:
            logging.captureWarnings(False)
            root.handlers, root.level = saved


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object the handler and Powertools read."""

    function_name: str
    timeout_s: int
    #: The function's MemorySize (LambdaPoller passes the template's).
    memory_limit_in_mb: int = 1024
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self.started)) * 1000))


@dataclass(frozen=True)
class EventSourceMapping:
    uuid: str
    queue_arn: str
    batch_size: int
    window_s: int


@dataclass(frozen=True)
class Invocation:
    records: int
    failures: int
    #: How long the handler ran here, against the emulator, and the CPU time this process spent meanwhile.
    seconds: float
    cpu_seconds: float
    #: The images its records asked for, for a function that says (the embedding function's lane requests).
    images: int = 0


def complete_s3_notification(body: str) -> str:
    """Gap: moto's S3 notifications leave out fields S3 always sends; add them as S3 would."""
    try:
        document = json.loads(body)
    except json.JSONDecodeError:
        return body
    if not isinstance(document, dict) or not isinstance(document.get("Records"), list):
        return body
    for record in document["Records"]:
        if record.get("eventSource") != "aws:s3":
            continue
        record.setdefault("userIdentity", {"principalId": "AWS:LOCAL"})
        record.setdefault("requestParameters", {"sourceIPAddress": "127.0.0.1"})
        record.setdefault("responseElements", {"x-amz-request-id": "LOCAL", "x-amz-id-2": "LOCAL"})
        record["s3"]["bucket"].setdefault("ownerIdentity", {"principalId": "LOCAL"})
        record["s3"]["object"].setdefault("sequencer", "0")
    return json.dumps(document)


@contextlib.contextmanager
def function_environment(environment: dict[str, str]) -> Iterator[None]:
    """The process's environment as Lambda gives one function (or as the emulator needs it), for as long
    as that function runs; what it set is put back after.

    Each function has a process of its own on Lambda; here several share this one, and what one
    reads at call time (Powertools' service name for a metric, say) must be its own, not the last loaded's.
    """
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_handler(path: Path, environment: dict[str, str]) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """Import a function's module fresh, in the environment Lambda would give it, like a cold start.

    The environment stays set: run each invocation in `function_environment` when several
    functions share the process.
    """
    os.environ.update(environment)
    name = f"local_{path.parent.name}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.lambda_handler


class LambdaPoller:
    """Lambda's SQS event source, for one function."""

    def __init__(
        self,
        clients: Clients,
        function_name: str,
        handler_path: Path = DISPATCHER,
        max_window_s: int | None = None,
        log: TextIO | None = None,
        extra_environment: dict[str, str] | None = None,
        images: Callable[[str], int] = lambda body: 0,
    ) -> None:
        self._lambda = clients.client("lambda")
        self._sqs = clients.client("sqs")
        #: Where the function's output goes (its CloudWatch logs): stderr unless a log file is given.
        self._log = log
        configuration = self._lambda.get_function_configuration(FunctionName=function_name)
        self.context_template = (function_name, int(configuration.get("Timeout", 3)), int(configuration.get("MemorySize", 128)))
        mappings = self._lambda.list_event_source_mappings(FunctionName=function_name)["EventSourceMappings"]
        self.mappings = [
            EventSourceMapping(
                m["UUID"],
                m["EventSourceArn"],
                int(m["BatchSize"]),
                min(int(m.get("MaximumBatchingWindowInSeconds", 0)), max_window_s if max_window_s is not None else 900),
            )
            for m in mappings
        ]
        for mapping in self.mappings:
            # Gap: moto would consume the queue itself with a stand-in Lambda; this poller takes its place.
            self._lambda.update_event_source_mapping(UUID=mapping.uuid, Enabled=False)
        environment = plain_environment(configuration.get("Environment", {}).get("Variables", {}))
        # Lambda's runtime provides an X-Ray daemon; locally there is none to send traces to.
        environment |= {"POWERTOOLS_TRACE_DISABLED": "true", "AWS_LAMBDA_FUNCTION_NAME": function_name}
        environment |= extra_environment or {}
        self._images = images
        self._environment = environment
        # The function's log lines are its CloudWatch logs: they go to the log, and stdout stays the command's.
        with contextlib.redirect_stdout(self._log or sys.stderr):
            self._handler = load_handler(handler_path, environment)

    def _queue_url(self, arn: str) -> str:
        return self._sqs.get_queue_url(QueueName=arn.rsplit(":", 1)[-1])["QueueUrl"]

    def _collect(self, url: str, mapping: EventSourceMapping) -> list[dict[str, Any]]:
        """Up to BatchSize messages, waiting at most the batching window once the first arrived."""
        messages: list[dict[str, Any]] = []
        deadline = None
        while len(messages) < mapping.batch_size:
            wanted = min(_RECEIVE_MAX, mapping.batch_size - len(messages))
            received = self._sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=wanted, AttributeNames=["All"], MessageAttributeNames=["All"]
            ).get("Messages", [])
            messages += received
            if messages and deadline is None:
                deadline = time.monotonic() + mapping.window_s
            if not messages or (deadline is not None and time.monotonic() >= deadline):
                break
            if not received:
                time.sleep(0.2)
        return messages

    def poll(self) -> list[Invocation]:
        """One round over every mapping; empty when the queues had nothing visible."""
        invocations = []
        for mapping in self.mappings:
            url = self._queue_url(mapping.queue_arn)
            messages = self._collect(url, mapping)
            if not messages:
                continue
            event = {
                "Records": [
                    {
                        "messageId": message["MessageId"],
                        "receiptHandle": message["ReceiptHandle"],
                        "body": complete_s3_notification(message["Body"]),
                        "attributes": message.get("Attributes", {}),
                        "messageAttributes": message.get("MessageAttributes", {}),
                        "md5OfBody": message["MD5OfBody"],
                        "eventSource": "aws:sqs",
                        "eventSourceARN": mapping.queue_arn,
                        "awsRegion": mapping.queue_arn.split(":")[3],
                    }
                    for message in messages
                ]
            }
            context = LambdaContext(*self.context_template)
            started, cpu_started = time.monotonic(), time.process_time()
            with contextlib.redirect_stdout(self._log or sys.stderr), function_environment(self._environment):
                response = self._handler(event, context) or {}
            seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
            failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
            done = [m for m in messages if m["MessageId"] not in failed]
            for start in range(0, len(done), 10):
                self._sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done[start : start + 10])],
                )
            for message in messages:
                if message["MessageId"] in failed:
                    # Locally nobody waits out the visibility timeout: retry at once; the redrive
                    # policy still moves a message to the DLQ after maxReceiveCount.
                    self._sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
            images = sum(self._images(message["Body"]) for message in messages)
            invocations.append(Invocation(len(messages), len(failed), seconds, cpu_seconds, images))
        return invocations


@dataclass(frozen=True)
class JobRun:
    job_id: str
    array_index: int | None
    exit_code: int
    attempt: int = 1


def exit_code_seen_by_batch(returncode: int) -> int:
    """subprocess reports a signal as its negative; a container's exit code is 128 + the signal."""
    return 128 - returncode if returncode < 0 else returncode


def retries(strategy: dict[str, Any], exit_code: int) -> bool:
    """Batch's rule: the first evaluateOnExit entry that matches decides; none matching retries.

    Locally there is no host to lose and no image to pull, so the reason patterns match only `*`.
    """
    for condition in strategy.get("evaluateOnExit", []):
        code = condition.get("onExitCode")
        reasons = [condition[name] for name in ("onReason", "onStatusReason") if condition.get(name)]
        if code is None and not reasons:
            continue
        if (code is None or fnmatch.fnmatchcase(str(exit_code), code)) and all(reason == "*" for reason in reasons):
            return str(condition.get("action", "")).upper() == "RETRY"
    return True


class BatchRunner:
    """AWS Batch for the stack's job queues (the GPU workers' and the index job's): runs every submitted
    job's container command as a local process, and runs it again as the job definition's retry strategy
    says (AWS_BATCH_JOB_ATTEMPT set)."""

    def __init__(self, clients: Clients, stack: Stack, extra_environment: dict[str, str]) -> None:
        self._batch = clients.client("batch")
        self._job_queues = [stack.output("JobQueueArn"), stack.output("IndexJobQueueArn")]
        self._clients = clients
        self._extra = extra_environment
        self._seen: set[str] = set()

    def _new_jobs(self) -> Iterator[dict[str, Any]]:
        # moto settles jobs at once without running them; what matters is that they were submitted.
        for queue, status in itertools.product(self._job_queues, jobs.STATES):
            pages = self._batch.get_paginator("list_jobs").paginate(jobQueue=queue, jobStatus=status)
            for summary in (job for page in pages for job in page["jobSummaryList"]):
                # Array children (parent:index) are the runner's to start, from their parent.
                if ":" not in summary["jobId"] and summary["jobId"] not in self._seen:
                    self._seen.add(summary["jobId"])
                    yield self._batch.describe_jobs(jobs=[summary["jobId"]])["jobs"][0]

    def _retry_strategy(self, job: dict[str, Any]) -> dict[str, Any]:
        if job.get("retryStrategy"):
            return dict(job["retryStrategy"])
        definitions = self._batch.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])["jobDefinitions"]
        return dict(definitions[0].get("retryStrategy") or {}) if definitions else {}

    def run_pending(self, on_output: Callable[[tuple[str, int | None], str], None] = lambda child, line: None) -> list[JobRun]:
        """Runs every job submitted since the last call; `on_output` gets each line a child prints."""
        runs = []
        for job in self._new_jobs():
            container = job["container"]
            environment = {
                **os.environ,
                **plain_environment(container.get("environment", [])),
                # The job definition insists on the GPU of the instances Batch starts (DEVICE=cuda); here
                # the job runs on this machine, with whatever it has.
                "DEVICE": "auto",
                "AWS_BATCH_JOB_ID": job["jobId"],
                "AWS_ENDPOINT_URL": self._clients.endpoint_url or "",
                **self._extra,
            }
            command = [sys.executable if part == "python" else part for part in container["command"]]
            strategy = self._retry_strategy(job)
            attempts = int(strategy.get("attempts") or 1)
            size = job.get("arrayProperties", {}).get("size")
            for index in range(size) if size else [None]:
                child = dict(environment)
                if index is not None:
                    child["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
                for attempt in range(1, attempts + 1):
                    environment_of_attempt = {**child, "AWS_BATCH_JOB_ATTEMPT": str(attempt)}
                    print_line = functools.partial(on_output, (job["jobId"], index))
                    exit_code = exit_code_seen_by_batch(self._run(command, environment_of_attempt, print_line))
                    runs.append(JobRun(job["jobId"], index, exit_code, attempt))
                    if exit_code == 0 or not retries(strategy, exit_code):
                        break
        return runs

    @staticmethod
    def _run(command: list[str], environment: dict[str, str], on_output: Callable[[str], None]) -> int:
        process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            on_output(line.rstrip("\n"))
        return process.wait()


def _in_flight(sqs: Any, queue_url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def lane_images(body: str) -> int:
    """How many images a lane request asks for (0 for a message that is not one)."""
    try:
        return LaneRequest.model_validate_json(body).images
    except ValueError:
        return 0


@dataclass(frozen=True)
class Round:
    """What one round of AWS's part did."""

    dispatched: list[Invocation]
    jobs: list[JobRun]
    indexed: list[Invocation]
    #: The embedding function's invocations (the Lambda lane), one lane request each.
    lane: list[Invocation] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dispatched or self.jobs or self.indexed or self.lane)


class StandIn:
    """What AWS does between the stack's resources, one round at a time: the dispatcher's, the indexer's
    and (with a Lambda lane) the embedding function's SQS pollers, and Batch. `clip-pipeline local
    --keep` goes on calling `step` after the first run, so that an upload to the kept emulator is
    processed too."""

    def __init__(self, clients: Clients, stack: Stack, extra_environment: dict[str, str], log: TextIO | None) -> None:
        # Its images: those of lane requests the Lambda lane handed to Batch (its fallback queue).
        self.dispatcher = LambdaPoller(clients, stack.output("DispatcherFunctionName"), log=log, images=lane_images)
        # The vector store's writer: finished shards go into the store that search reads.
        self.indexer = LambdaPoller(clients, stack.output("IndexerFunctionName"), INDEXER, max_window_s=LOCAL_WINDOW_S, log=log)
        # The Lambda lane's queues exist whatever EmbedLane is: with the lane off, the dispatcher drains them.
        self._queues = [
            stack.output(name) for name in ("UploadQueueUrl", "IndexerQueueUrl", "EmbedQueueUrl", "LaneFallbackQueueUrl")
        ]
        # The Lambda lane: the worker's code in this process, as the function runs it (warm after the first).
        self.embedder = None
        if "EmbedFunctionName" in stack.outputs:
            self.embedder = LambdaPoller(
                clients,
                stack.output("EmbedFunctionName"),
                EMBEDDER,
                log=log,
                extra_environment=extra_environment,
                images=lane_images,
            )
        self.batch = BatchRunner(clients, stack, extra_environment)
        self._sqs = clients.client("sqs")
        self.log = log

    def step(self, worker_line: Callable[[tuple[str, int | None], str], None], say: Callable[[str], None]) -> Round:
        """One round: dispatch what the upload queue (and the lane's fallback queue) holds, embed the
        lane's requests, run the jobs submitted, index their shards."""
        invocations = self.dispatcher.poll()
        for invocation in invocations:
            if invocation.images:
                say(f"lambda lane: {invocation.images} images handed to Batch")
        lane = self.embedder.poll() if self.embedder else []
        for invocation in lane:
            say(f"lambda lane: {invocation.images} images in {invocation.seconds:.1f} s")
        done = self.batch.run_pending(worker_line)
        for run in done:
            child = "" if run.array_index is None else f" child {run.array_index}"
            say(f"batch job {run.job_id}{child} attempt {run.attempt}: exit {run.exit_code}")
        return Round(invocations, done, self.indexer.poll(), lane)

    def idle(self) -> bool:
        return not any(_in_flight(self._sqs, url) for url in self._queues)

    def keep_running(self, say: Callable[[str], None], pause_s: float = 1.0) -> None:
        """Go on doing AWS's part until interrupted (Ctrl-C)."""

        def worker_line(child: tuple[str, int | None], line: str) -> None:
            print(line, file=self.log or sys.stderr)

        while True:
            if not self.step(worker_line, say):
                time.sleep(pause_s)


@dataclass(frozen=True)
class PipelineRun:
    runs: list[JobRun]
    #: Every dispatcher invocation (one SQS batch handed to the handler).
    invocations: list[Invocation]
    seconds: float
    #: Every indexer invocation (finished shards into the vector store).
    indexer_invocations: list[Invocation] = field(default_factory=list)
    #: How many files were uploaded, and why each of the others was not (by its path in the folder,
    #: a name that is not UTF-8 with Python's stand-ins for its bytes).
    uploaded: int = 0
    not_uploaded: dict[str, str] = field(default_factory=dict)
    #: What did AWS's part, to go on with (`--keep`).
    stand_in: StandIn | None = None
    #: Every invocation of the embedding function (the Lambda lane).
    lane_invocations: list[Invocation] = field(default_factory=list)


def unstorable(key: str) -> str | None:
    """Why S3, or the emulator standing in for it, would not store an object under `key`; None if it would."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "its name is not UTF-8, which an S3 key must be"
    if size > keys.MAX_KEY_BYTES:
        return f"its name is {size} bytes in UTF-8; an S3 key is at most {keys.MAX_KEY_BYTES}"
    if "\n" in key:
        # Gap: S3 takes a line break in a key; moto's server routes no request for one (404).
        return "the emulator cannot store a key with a line break (S3 can)"
    return None


def upload(s3: Any, bucket: str, folder: Path, path: Path) -> str | None:
    """Upload one file under its path in `folder`; why it was not, or None when it was."""
    key = path.relative_to(folder).as_posix()
    if reason := unstorable(key):
        return reason
    try:
        s3.upload_file(str(path), bucket, key)
    except (OSError, S3UploadFailedError, ClientError, BotoCoreError) as exc:  # unreadable, gone since listed, refused
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class _ChildProgress:
    """The latest `done` each job child's worker reported, for one running total."""

    done: dict[tuple[str, int | None], int] = field(default_factory=dict)

    def total(self) -> int:
        return sum(self.done.values())


def run_pipeline(
    clients: Clients,
    stack: Stack,
    folder: Path,
    files: list[Path],
    reporter: Reporter,
    extra_environment: dict[str, str],
    say: Callable[[str], None],
    log: TextIO | None = None,
) -> PipelineRun:
    """Upload `files`, then do what AWS would until every upload is dispatched and every job has run.

    The functions' and the workers' own output goes to `log`, or to stderr when it is None.
    """
    aws = StandIn(clients, stack, extra_environment, log)
    s3 = clients.client("s3")
    started = time.monotonic()
    input_bucket = stack.output("InputBucketName")
    reporter.start("uploaded", len(files))
    not_uploaded: dict[str, str] = {}
    for count, path in enumerate(files, 1):
        if reason := upload(s3, input_bucket, folder, path):
            not_uploaded[path.relative_to(folder).as_posix()] = reason
        reporter.update("uploaded", count)
    uploaded = len(files) - len(not_uploaded)
    reporter.start("dispatched", uploaded)
    reporter.start("processed", uploaded)
    dispatched = 0
    children = _ChildProgress()

    def worker_line(child: tuple[str, int | None], line: str) -> None:
        print(line, file=log or sys.stderr)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return
        message = record.get("message")
        if message in ("progress", "job finished", "job interrupted") and "done" in record:
            children.done[child] = record["done"]
            reporter.update("processed", children.total())
        elif message == "object failed":
            say(f"worker: {record.get('url')}: {record.get('code')}")

    runs: list[JobRun] = []
    invoked: list[Invocation] = []
    indexed: list[Invocation] = []
    lane: list[Invocation] = []
    while True:
        did = aws.step(worker_line, say)
        invoked += did.dispatched
        dispatched += sum(invocation.records - invocation.failures for invocation in did.dispatched)
        reporter.update("dispatched", dispatched)
        runs += did.jobs
        indexed += did.indexed
        lane += did.lane
        if not did and aws.idle():
            return PipelineRun(runs, invoked, time.monotonic() - started, indexed, uploaded, not_uploaded, aws, lane)
