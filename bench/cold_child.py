"""One cold start of the query function, in the fresh process query_bench starts for it:

    python -m bench.cold_child function '<settings json>'   imports, init, first invocations
    python -m bench.cold_child torch '<settings json>'      the floor: `import torch` and nothing else

Times are wall-clock (time.time), so the parent can count the interpreter's start from the moment it
spawned this process; the results go to the settings' `out` file as JSON. Nothing is imported at
module level but what the timing itself needs: every import is part of what is measured.
"""

from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402 - after the clock starts, as everything here
import sys  # noqa: E402 - after the clock starts, as everything here
from typing import Any  # noqa: E402 - after the clock starts, as everything here


def peak_rss_mb(pid: int | str = "self") -> float:
    # The peak resident memory of a process (this one) since its exec. (getrusage's ru_maxrss would
    # not do: Linux carries the parent's high-water mark across fork and exec.)
    with open(f"/proc/{pid}/status") as stream:
        peak_kib = next(int(line.split()[1]) for line in stream if line.startswith("VmHWM:"))
    return peak_kib * 1024 / 1e6


class LambdaContext:
    """What Powertools reads of Lambda's context (clip_pipeline.local's would import the CLI and
    moto's CloudFormation, seconds of modules the function never loads)."""

    def __init__(self, function_name: str, timeout_s: float, memory_mb: int) -> None:
        import uuid

        self.function_name = function_name
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def stopwatch(module: Any, name: str, seconds: list[float]) -> None:
    """Times every call of `module.name` into `seconds`."""
    real = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        before = time.time()
        try:
            return real(*args, **kwargs)
        finally:
            seconds.append(time.time() - before)

    setattr(module, name, timed)


def time_imports(groups: list[tuple[str, str]]) -> dict[str, float]:
    """Seconds each group of import statements takes, in order (each group's share of a cold start)."""
    imports = {}
    for name, statement in groups:
        before = time.time()
        exec(statement, {})  # noqa: S102 - the benchmark's own import statements, timed group by group
        imports[name] = time.time() - before
    return imports


def function(settings: dict[str, Any]) -> dict[str, Any]:
    imports = time_imports(settings["import_groups"])
    imported = time.time()

    # The harness, not timed: a stopwatch on the model load. S3 is a moto server in the parent
    # process (AWS_ENDPOINT_URL): moto imported here would slow what follows for no reason of the
    # function's own (its objects make every garbage collection longer).
    import clip_query.service
    import clip_shared.keys

    model_load: list[float] = []
    weights_id: list[float] = []
    stopwatch(clip_query.service, "load", model_load)
    # A checkpoint file is named by its content (a SHA-256 of the file); a tag such as `openai` is not.
    stopwatch(clip_shared.keys, "weights_id", weights_id)
    harness = time.time()

    import clip_query.lambda_function as entry

    initialised = time.time()
    first = {}
    for name, path in settings["events"].items():
        with open(path) as stream:
            event = json.load(stream)
        context = LambdaContext(settings["function"], 29, settings["memory_mb"])
        before = time.time()
        response = entry.handler(event, context)
        first[name] = time.time() - before
        if response["statusCode"] != 200:
            raise SystemExit(f"{name}: status {response['statusCode']}: {response['body'][:500]}")
    entry.service.s3.head_bucket(Bucket=settings["bucket"])  # after the timings: the function reaches the moto server
    return {
        "started": STARTED,
        "imports": imports,
        "imported": imported,
        "harness_s": harness - imported,
        "init_s": initialised - harness,
        "model_load_s": model_load[0],
        "weights_id_s": sum(weights_id),
        "first": first,
        "peak_rss_mb": peak_rss_mb(),
    }


def torch_floor(settings: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401 - the import is what is measured

    return {"started": STARTED, "imported": time.time(), "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    kind, raw = sys.argv[1], json.loads(sys.argv[2])
    results = {"function": function, "torch": torch_floor}[kind](raw)
    with open(raw["out"], "w") as stream:
        json.dump(results, stream)
