"""`clip-pipeline`: the pipeline on a laptop, and the jobs S3 events don't cover on a deployed stack."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.exceptions import TyperException

from clip_dispatch.submission import SubmittedJob
from clip_pipeline import emulator, local, report
from clip_pipeline import jobs as batch_jobs
from clip_pipeline.progress import Reporter
from clip_pipeline.stack import SAMCONFIG, Clients, Stack, StackError, default_stack_name, explain, read_stack
from clip_pipeline.submitter import Target
from clip_shared import defaults, keys
from clip_shared.lane import LAMBDA_LANE_MAX_IMAGES, EmbedLane

SAMPLES = emulator.REPOSITORY / "samples"
#: Set to 1 for the traceback of an unexpected failure, which otherwise ends in one line.
DEBUG_VARIABLE = "CLIP_PIPELINE_DEBUG"

console = Console(stderr=True)

StackName = Annotated[str, typer.Option("--stack-name", help="Stack to operate on (default: samconfig.toml's).")]
EndpointUrl = Annotated[str | None, typer.Option("--endpoint-url", help="AWS endpoint, e.g. an emulator's.")]
Region = Annotated[str | None, typer.Option("--region", help="AWS region (default: the standard settings).")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]


class Failure(typer.Exit):
    """Ends the command with one clear line on stderr and exit code 2."""

    def __init__(self, message: str) -> None:
        # Not markup (a message may hold "[Errno 111]"), and not wrapped: one line, copyable.
        console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
        super().__init__(code=2)


class _Commands(typer.core.TyperGroup):
    """Every command ends a failure in one line that says what to do, and exit code 2.

    Here at the edge, not in each command: missing credentials, region or network can surface
    from any AWS call, deep in a command or in a library it calls.
    """

    # Any: typer types the context with the click it bundles privately (typer._click).
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # usage errors and exits say their own piece
            raise
        except Exception as exc:
            if os.environ.get(DEBUG_VARIABLE) == "1":
                raise
            said = explain(exc)
            if said is None:
                said = (
                    f"unexpected {type(exc).__name__}: {exc} (a bug: run it again with {DEBUG_VARIABLE}=1 "
                    "for the traceback, and report it)"
                )
            raise Failure(said) from exc


app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Commands)


@app.callback()
def _group() -> None:
    """clip-pipeline: run the CLIP embedding pipeline locally, or operate a deployed stack."""


def _stack(stack_name: str | None, endpoint_url: str | None, region: str | None) -> tuple[Clients, Stack]:
    clients = Clients(endpoint_url, region)
    try:
        return clients, read_stack(clients, stack_name or default_stack_name())
    except StackError as exc:
        raise Failure(str(exc)) from exc


HUB = ("huggingface.co", 443)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB, timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _load_model(model: str, pretrained: str, model_config: Path | None, device: str | None = None) -> Any:
    """The model, or one clear line and exit 2 when its weights cannot be had."""
    from_hub = model.startswith("hf-hub:") or not (pretrained.lower() == keys.RANDOM_WEIGHTS or Path(pretrained).is_file())
    if from_hub and not _hub_reachable():
        # Weights already in the cache still load; missing ones fail at once instead of after a
        # minute of the hub client's retries. Set before huggingface_hub is imported: it reads it then.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clip_worker.model import ModelLoadError, load

    # Seconds of silence otherwise (torch, then the weights); on stderr, so --json output stays clean.
    console.print(f"Loading {model} ({pretrained}) ...", soft_wrap=True, highlight=False)
    root = logging.getLogger()
    # The libraries' own warnings about a failed download end in our one line below, not before it;
    # where a log file collects them (`local`), they still go there.
    quiet = logging.NullHandler() if not root.handlers else None
    if quiet:
        root.addHandler(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load(model, pretrained, device, model_config_path=str(model_config) if model_config else None)
    except ModelLoadError as exc:
        raise Failure(
            f"cannot load {model} weights {pretrained!r} (offline?): pass --pretrained /path/to/checkpoint.pt, "
            f"or --pretrained none for a smoke run with random weights. ({exc.__cause__ or exc})"
        ) from exc
    finally:
        if quiet:
            root.removeHandler(quiet)


@app.command("local")
def local_command(
    folder: Annotated[
        Path, typer.Argument(help="Images to upload (default: the bundled samples).", exists=True, file_okay=False)
    ] = SAMPLES,
    model: Annotated[str, typer.Option(help="open_clip model name.")] = defaults.MODEL,
    pretrained: Annotated[str, typer.Option(help="open_clip tag, checkpoint file, or `none`.")] = defaults.PRETRAINED,
    model_config: Annotated[Path | None, typer.Option(help="Extra open_clip model config (JSON file or folder).")] = None,
    batching_window: Annotated[int, typer.Option(help="The dispatcher's MaximumBatchingWindowInSeconds.")] = 2,
    shard_size: Annotated[
        int, typer.Option(help="Images per Batch array child (the ShardSize parameter).")
    ] = defaults.SHARD_SIZE,
    labels: Annotated[
        str,
        typer.Option(
            help="Zero-shot keywords in each event: `default`, labels separated by commas, or an s3:// label file (the ClipLabels parameter). Off when empty."
        ),
    ] = "",
    keywords_top_k: Annotated[int, typer.Option(min=1, help="Labels per image with --labels (the KeywordsTopK parameter).")] = 5,
    lane: Annotated[
        EmbedLane,
        typer.Option(
            help="Which lane embeds each batch (the EmbedLane parameter): batch jobs, the Lambda lane, or auto by size."
        ),
    ] = EmbedLane.BATCH,
    lane_max_images: Annotated[
        int, typer.Option(min=1, help="The most images a Lambda lane request takes (the LambdaLaneMaxImages parameter).")
    ] = LAMBDA_LANE_MAX_IMAGES,
    keep: Annotated[bool, typer.Option("--keep", help="Leave the emulator running and print how to query it.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the functions' and workers' logs and library warnings as they come.")
    ] = False,
    serve_api: Annotated[bool, typer.Option("--serve", help="Then serve the query API and demo page over the results.")] = False,
    port: Annotated[int, typer.Option(help="The query API's port with --serve (0 picks a free one).")] = 8080,
    json_output: JsonOutput = False,
) -> None:
    """Run the whole pipeline on an embedded AWS emulator: upload, SQS, dispatcher, Batch jobs, outputs."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*moto's CloudFormation.*")
    log_path = None if verbose else Path(tempfile.gettempdir()) / f"clip-pipeline-local-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with local.captured_logs(log_path) as log:
        # Loaded once up front, so missing weights end the run in one line instead of failing every job.
        clip = _load_model(model, pretrained, model_config, device="cpu")
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        parameters = {
            "ClipModel": model,
            "ClipPretrained": pretrained,
            "MaximumBatchingWindowInSeconds": str(batching_window),
            "ShardSize": str(shard_size),
            "ClipLabels": labels,
            "KeywordsTopK": str(keywords_top_k),
            "EmbedLane": str(lane),
            "LambdaLaneMaxImages": str(lane_max_images),
        }
        if not json_output:
            console.print("Creating the stack from template.yaml in the emulator...")
        with local.emulated_stack(parameters) as (clients, stack):
            extra = {"CLIP_MODEL_CONFIG": str(model_config.resolve())} if model_config else {}
            reporter = Reporter(console, json_output)
            model_id = keys.model_id(model, pretrained)
            with reporter.shown():
                say = console.print if not json_output else lambda line: None
                pipeline = local.run_pipeline(clients, stack, folder, files, reporter, extra, say, log)
                s3 = clients.client("s3")
                outcomes = report.tally(s3, stack.output("OutputBucketName"), stack.output_prefix, model_id)
                # Every upload has an outcome now, a rejection included: the bar ends at its total.
                reporter.update("processed", outcomes.recorded)
            _print_summary(clients, stack, pipeline, outcomes, json_output, log_path)
            if serve_api:
                _serve(clients, stack, "127.0.0.1", port, None, model_config, json_output, clip)
            elif keep:
                assert pipeline.stand_in is not None  # run_pipeline always hands it back
                _wait_for_interrupt(clients, stack, pipeline.stand_in, say)


def _print_summary(
    clients: Clients,
    stack: Stack,
    pipeline: local.PipelineRun,
    outcomes: report.Outcomes,
    json_output: bool,
    log_path: Path | None,
) -> None:
    output = stack.output("OutputBucketName")
    model_id = keys.model_id(stack.model, stack.pretrained)
    runs, elapsed = pipeline.runs, pipeline.seconds
    summary = {
        "uploaded": pipeline.uploaded,
        "not_uploaded": pipeline.not_uploaded,
        **outcomes.as_dict(),
        "batch_jobs": len({run.job_id for run in runs}),
        # The Lambda lane's work: its requests, the images they held, and those it handed to Batch.
        "lane_requests": len(pipeline.lane_invocations),
        "lane_images": sum(invocation.images for invocation in pipeline.lane_invocations),
        "lane_handed_to_batch": sum(invocation.images for invocation in pipeline.invocations),
        "job_runs": len(runs),
        "failed_job_runs": sum(1 for run in runs if run.exit_code != 0),
        "seconds": round(elapsed, 2),
        "images_per_s": round(outcomes.embedded / elapsed, 2) if elapsed else 0.0,
        "events": keys.s3_url(output, keys.events_prefix(stack.output_prefix, model_id)),
        "parquet": keys.s3_url(output, keys.parquet_prefix(stack.output_prefix, model_id)),
        "endpoint_url": clients.endpoint_url,
        "stack_name": stack.name,
        "log": str(log_path) if log_path else None,
    }
    if json_output:
        # One line, so a script can read it while --keep holds the emulator open.
        typer.echo(json.dumps(summary), nl=True)
        sys.stdout.flush()
        return
    table = Table(title="clip-pipeline local", show_header=False)
    table.add_row("uploaded", str(summary["uploaded"]))
    if pipeline.not_uploaded:
        table.add_row("not uploaded", str(len(pipeline.not_uploaded)))
        for name, reason in sorted(pipeline.not_uploaded.items()):
            table.add_row("", f"{name!r}: {reason}")
    _outcome_rows(table, outcomes)
    table.add_row("batch jobs", f"{summary['batch_jobs']} ({summary['job_runs']} runs, {summary['failed_job_runs']} failed)")
    if pipeline.lane_invocations:
        table.add_row(
            "lambda lane",
            f"{summary['lane_requests']} requests, {summary['lane_images']} images ({summary['lane_handed_to_batch']} handed to Batch)",
        )
    table.add_row("time", f"{summary['seconds']} s")
    table.add_row("images/s", str(summary["images_per_s"]))
    out = Console()
    out.print(table)
    # Below the table, not in it: a table cuts a long URI or path to its width, and it must stay copyable.
    for name in ("events", "parquet", "log"):
        if summary[name]:
            out.print(f"{name:<8} {summary[name]}", soft_wrap=True, highlight=False)


def _outcome_rows(table: Table, outcomes: report.Outcomes) -> None:
    """Objects embedded, rejected and failed, each reason under its own outcome's row (a rejection
    listed under "failed 0" reads as a failure), a few by url."""
    table.add_row("embedded", str(outcomes.embedded))
    codes = ", ".join(f"{code} {count}" for code, count in outcomes.failed.most_common())
    for name, count, examples in (
        ("rejected", outcomes.rejected, outcomes.rejected_examples),
        ("failed", outcomes.failed.total(), outcomes.failed_examples),
    ):
        table.add_row(name, f"{count} ({codes})" if name == "failed" and count else str(count))
        for url, outcome in sorted(examples.items()):
            table.add_row("", f"{url}: {outcome.code}: {outcome.message}")
        if count > len(examples):
            more = "`clip-pipeline retry --dry-run` counts those a retry would take" if name == "failed" else ""
            table.add_row("", f"and {count - len(examples)} more{'; ' + more if more else ''}")


def kept_commands(clients: Clients, stack: Stack) -> list[str]:
    """Commands that query a kept emulator as printed: the emulator takes any credentials, but they must be set."""
    endpoint = clients.endpoint_url
    return [
        f"export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION={emulator.REGION}",
        f"aws --endpoint-url {endpoint} s3 ls s3://{stack.output('OutputBucketName')}/ --recursive",
        f"clip-pipeline status --stack-name {stack.name} --endpoint-url {endpoint}",
    ]


def _wait_for_interrupt(clients: Clients, stack: Stack, stand_in: local.StandIn, say: Any) -> None:
    console.print(
        f"\nThe emulator and the pipeline keep running at {clients.endpoint_url} (Ctrl-C stops them): an upload to "
        f"s3://{stack.output('InputBucketName')}/ is embedded as on AWS. From another shell:",
        soft_wrap=True,
    )
    for command in kept_commands(clients, stack):
        console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)
    # Python leaves SIGINT ignored when it started ignored (a job started in the background by a
    # script); "Ctrl-C stops it" must hold however it was started, as it does for `serve`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stand_in.keep_running(say)
    except KeyboardInterrupt:
        pass


ModelOption = Annotated[str | None, typer.Option("--model", help="open_clip model (default: the stack's).")]
PretrainedOption = Annotated[str | None, typer.Option("--pretrained", help="Weights (default: the stack's).")]
ModelConfigOption = Annotated[Path | None, typer.Option("--model-config", help="Extra open_clip model config.")]
TopOption = Annotated[int, typer.Option("--top", min=1, help="How many results.")]


def _model(stack: Stack | None, model: str | None, pretrained: str | None, model_config: Path | None) -> Any:
    name = model or (stack.model if stack else defaults.MODEL)
    weights = pretrained or (stack.pretrained if stack else defaults.PRETRAINED)
    return _load_model(name, weights, model_config)


def _store(clients: Clients, stack: Stack, model_id: str) -> Any:
    """The stack's vector store for one model, read as it is now (a one-shot command)."""
    from clip_store import VectorStore, store_uri

    uri = store_uri(stack.output("OutputBucketName"), stack.output_prefix, model_id)
    store = VectorStore(uri, settings=clients.storage(), refresh_s=None)
    if not store.count():
        raise Failure(f"stack {stack.name} has no vectors for {model_id} yet (see `clip-pipeline status`)")
    return store


def _print_matches(matches: list[Any], json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps([{"url": m.url, "score": round(m.score, 6)} for m in matches], indent=2))
        return
    table = Table("rank", "score", "url")
    for rank, match in enumerate(matches, 1):
        table.add_row(str(rank), f"{match.score:.4f}", match.url)
    Console().print(table)


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="What to look for, e.g. 'a red bicycle'.")],
    top: TopOption = 10,
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    model_config: ModelConfigOption = None,
    json_output: JsonOutput = False,
) -> None:
    """Rank the stack's images by cosine similarity to a text, with the model's text tower."""
    clients, stack = _stack(stack_name, endpoint_url, region)
    clip = _model(stack, model, pretrained, model_config)
    _print_matches(_store(clients, stack, clip.id).nearest(clip.embed_texts([text])[0], top), json_output)


@app.command()
def similar(
    url: Annotated[str, typer.Argument(help="An embedded image, s3://bucket/key.")],
    top: TopOption = 10,
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    json_output: JsonOutput = False,
) -> None:
    """Rank the stack's images by cosine similarity to one already embedded image."""
    clients, stack = _stack(stack_name, endpoint_url, region)
    store = _store(clients, stack, keys.model_id(model or stack.model, pretrained or stack.pretrained))
    vector = store.vector_of(url)
    if vector is None:
        raise Failure(f"{url} has no vector in stack {stack.name}: upload it, or `clip-pipeline backfill` its prefix")
    matches = store.nearest(vector, top, exclude=[url])
    _print_matches(matches, json_output)


@app.command("embed-text")
def embed_text(
    text: Annotated[str, typer.Argument(help="The text to embed.")],
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    model_config: ModelConfigOption = None,
    standalone: Annotated[bool, typer.Option("--standalone", help="Use --model/--pretrained without reading a stack.")] = False,
) -> None:
    """Print a text's normalised embedding as a JSON array (the stack's model, unless --standalone)."""
    stack = None if standalone else _stack(stack_name, endpoint_url, region)[1]
    clip = _model(stack, model, pretrained, model_config)
    typer.echo(json.dumps(clip.embed_texts([text])[0].tolist()))


@app.command()
def status(
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    json_output: JsonOutput = False,
) -> None:
    """Jobs by state (those waiting for an instance with why), outcomes embedded, rejected and failed as the jobs
    recorded them (an object embedded twice counts twice; the index holds it once), the dead-letter queue's depth,
    and the vector index with its search settings and measured recall."""
    from clip_pipeline.index import store_indexes

    clients, stack = _stack(stack_name, endpoint_url, region)
    found = report.status(clients, stack)
    indexes = store_indexes(clients, stack)
    outcomes = found.outcomes
    cancel = batch_jobs.cancel_waiting_command(stack.output("JobQueueArn"), clients.region) if found.waiting else None
    result = {
        "stack": stack.name,
        "model": stack.model,
        "pretrained": stack.pretrained,
        "jobs": found.jobs,
        "waiting": found.waiting,
        "cancel_waiting_command": cancel,
        **outcomes.as_dict(),
        "upload_queue": found.uploads.as_dict(),
        "lane_queue": found.lane.as_dict() if found.lane else None,
        "lane_fallback_queue": found.lane_fallbacks.as_dict() if found.lane_fallbacks else None,
        "dead_letter_messages": found.dead_letters,
        "indexes": indexes,
        "index_jobs": found.index_jobs,
    }
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{stack.name} ({stack.model}/{stack.pretrained})", show_header=False)
    table.add_row("jobs", ", ".join(f"{state.lower()} {count}" for state, count in found.jobs.items()))
    for job in found.waiting:
        children = f", {job['waiting']} of its children" if job["waiting"] > 1 else ""
        table.add_row("", f"waiting since {job['since']}: {job['name']} ({job['job_id']}{children}): {job['reason']}")
    if cancel:
        # Batch cancels one job at the head of the queue per RunnableTimeoutSeconds (docs/operations.md).
        table.add_row(
            "",
            f"Batch cancels these one at a time, one per RunnableTimeoutSeconds; to cancel them all now (then fix the cause "
            f"and `clip-pipeline retry --failed-jobs`):\n{cancel}",
        )
    _outcome_rows(table, outcomes)
    for name, queue in (
        ("upload queue", found.uploads),
        ("lambda lane queue", found.lane),
        ("lane to Batch", found.lane_fallbacks),
    ):
        if queue is not None:
            age = "oldest unknown" if queue.oldest_s is None else f"oldest {queue.oldest_s} s"
            table.add_row(name, f"{queue.waiting} waiting, {queue.in_flight} in flight, {age}")
    table.add_row("dead-letter queue", f"{found.dead_letters} messages")
    for model_id, index in indexes.items():
        table.add_row(f"index {model_id}", f"{index['rows']:,} rows, {index['index']}, {index['unindexed_rows']:,} not yet in it")
        table.add_row("", f"search: {index['search']}")
    if found.index_jobs is not None:
        table.add_row("index jobs", ", ".join(f"{state.lower()} {count}" for state, count in found.index_jobs.items()))
    Console().print(table)


@app.command("backfill")
def backfill_command(
    url: Annotated[str, typer.Argument(help="s3://bucket/prefix of objects uploaded before the stack existed.")],
    threads: Annotated[int, typer.Option(min=1, max=256, help="Objects admitted at once (each is a ranged GET).")] = 32,
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    json_output: JsonOutput = False,
) -> None:
    """Embed objects S3 events never announced, through the dispatcher's own checks and submit code."""
    from clip_pipeline.backfill import backfill

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket:
        raise Failure(f"{url!r} is not an s3://bucket/prefix URL")
    clients, stack = _stack(stack_name, endpoint_url, region)
    if bucket != stack.output("InputBucketName"):
        console.print(
            f"[yellow]warning:[/yellow] the stack's job role reads only s3://{stack.output('InputBucketName')}/; "
            f"jobs for s3://{bucket}/ fail unless you grant it read access"
        )
    reporter = Reporter(console, json_output)
    reporter.start("listed")
    reporter.start("admitted")

    def on_page(counts: dict[str, int]) -> None:
        reporter.update("listed", counts["listed"])
        reporter.update("admitted", counts["submitted"])

    with reporter.shown():
        counts = backfill(Target.of(clients, stack), bucket, prefix, _announce, on_page, threads)
    _print_counts(f"backfill {url}", counts, json_output)


def _announce(job: SubmittedJob, entries: int) -> None:
    console.print(
        f"submitted job {job.job_id}: {entries} objects" + (f", {job.array_size} array children" if job.array_size else "")
    )


def _print_counts(title: str, counts: dict[str, Any], json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps(counts, indent=2))
        return
    table = Table(title=title, show_header=False)
    for name, value in counts.items():
        table.add_row(name.replace("_", " "), str(value))
    Console().print(table)


@app.command("retry")
def retry_command(
    code: Annotated[
        list[str] | None,
        typer.Option(
            "--code",
            help="Only failures with this error code (repeatable), e.g. download-failed. Without it, every failure "
            "but too-costly (the same bytes would cost the same again).",
        ),
    ] = None,
    failed_jobs: Annotated[
        bool,
        typer.Option(
            "--failed-jobs",
            help="Also objects of failed jobs that never got an outcome (e.g. cancelled after waiting for a GPU).",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be resubmitted; change nothing.")] = False,
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    json_output: JsonOutput = False,
) -> None:
    """Resubmit objects whose outcome is document-failed, through the dispatcher's checks. Safe to run twice."""
    from clip_pipeline import retry

    clients, stack = _stack(stack_name, endpoint_url, region)
    target = Target.of(clients, stack)
    with console.status("Reading failures ..."):
        candidates = retry.candidates(target, code or [], failed_jobs)
    counts = retry.retry(target, candidates, dry_run, _announce)
    _print_counts("retry (dry run)" if dry_run else "retry", {"dry_run": dry_run, **counts}, json_output)


@app.command("redrive")
def redrive_command(
    indexer: Annotated[
        bool,
        typer.Option(
            "--indexer", help="The indexer's dead-letter queue (shards and deletions search missed) instead of the uploads'."
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say how many messages wait; move none.")] = False,
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    json_output: JsonOutput = False,
) -> None:
    """Move a dead-letter queue's messages back to its queue, for the dispatcher (or the indexer) to try again."""
    from clip_pipeline.redrive import RedriveError, redrive

    clients, stack = _stack(stack_name, endpoint_url, region)
    dead_letters, queue = (
        ("IndexerDeadLetterQueueUrl", "IndexerQueueUrl") if indexer else ("DeadLetterQueueUrl", "UploadQueueUrl")
    )
    try:
        result = redrive(clients.client("sqs"), stack.output(dead_letters), stack.output(queue), dry_run)
    except RedriveError as exc:
        raise Failure(str(exc)) from exc
    counts = {"dry_run": dry_run, "queue": "indexer" if indexer else "uploads", "waiting": result.waiting, "moved": result.moved}
    _print_counts("redrive (dry run)" if dry_run else "redrive", counts, json_output)


@app.command("index")
def index_command(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what is due for each model's index; change nothing.")] = False,
    here: Annotated[
        bool,
        typer.Option(
            "--here", help="Train on this machine (reading the whole table from S3) instead of submitting the stack's Batch job."
        ),
    ] = False,
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    json_output: JsonOutput = False,
) -> None:
    """Build, retrain or update each model's vector index (as a Batch job, or --here), with no time limit; show its
    search settings and the recall measured with them."""
    from clip_pipeline.index import maintain_stores

    clients, stack = _stack(stack_name, endpoint_url, region)

    def on_start(model_id: str, due: str) -> None:
        if not dry_run and due != "none":
            where = "here (a retrain of millions of rows takes minutes)" if here else "submitting the stack's index job"
            console.print(f"{model_id}: {due}, {where} ...")

    results = maintain_stores(clients, stack, dry_run, here, on_start)
    if not results:
        raise Failure(f"stack {stack.name} has no vector store yet (see `clip-pipeline status`)")
    if json_output:
        typer.echo(json.dumps(results, indent=2))
        return
    table = Table(*(name.replace("_", " ") for name in results[0]), title="index (dry run)" if dry_run else "index")
    for result in results:
        table.add_row(
            *(f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value) for value in result.values())
        )
    Console().print(table)


@app.command()
def serve(
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).")] = 8080,
    pretrained: Annotated[str | None, typer.Option(help="Weights (default: the stack's), e.g. a local checkpoint.")] = None,
    model_config: ModelConfigOption = None,
    json_output: JsonOutput = False,
) -> None:
    """Run the query API and its demo page here, over the stack's stored vectors (no Docker)."""
    clients, stack = _stack(stack_name, endpoint_url, region)
    _serve(clients, stack, host, port, pretrained, model_config, json_output)


def _serve(
    clients: Clients,
    stack: Stack,
    host: str,
    port: int,
    pretrained: str | None,
    model_config: Path | None,
    json_output: bool,
    model: Any = None,
) -> None:
    """Serve until Ctrl-C; `model` is the stack's model when the caller has it loaded already."""
    from clip_pipeline import serve

    try:
        config = serve.query_config(clients, stack, pretrained, model_config)
        model = model or _load_model(config.model, config.pretrained, model_config)
        listener = serve.listen(host, port)
    except serve.ServeError as exc:
        raise Failure(str(exc)) from exc
    if json_output:
        typer.echo(json.dumps({"url": serve.url_of(host, listener), "stack_name": stack.name, "model": config.model}))
        sys.stdout.flush()
    else:
        console.print(
            f"Query API and demo page for stack {stack.name} ({config.model}) at {serve.url_of(host, listener)} (Ctrl-C stops it)"
        )
    serve.serve(config, clients.client("s3"), model, listener, clients.storage())


@app.command()
def preflight(
    stack_name: StackName = "",
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    parameter_overrides: Annotated[
        list[str] | None, typer.Option("--parameter-overrides", help="NAME=VALUE pairs, as for `sam deploy` (repeatable).")
    ] = None,
    config_file: Annotated[Path, typer.Option("--config-file", help="The samconfig.toml `sam deploy` reads.")] = SAMCONFIG,
    json_output: JsonOutput = False,
) -> None:
    """Check the account before a first `sam deploy`: quotas, network, python3.12. Exit 1 when a check fails."""
    from clip_pipeline import preflight as checks

    try:
        parameters = checks.deploy_parameters(
            stack_name or default_stack_name(config_file), parameter_overrides or [], samconfig=config_file
        )
        report = checks.run(Clients(endpoint_url, region).client, parameters)
    except checks.PreflightError as exc:
        raise Failure(f"{exc.code}: {exc}") from exc
    if json_output:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        checks.render(report, Console())
    raise typer.Exit(0 if report.ok else 1)


def main() -> None:
    app()
