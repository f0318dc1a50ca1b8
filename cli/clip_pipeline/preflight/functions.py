"""The stack's Lambda functions against the account's concurrency and memory limits.

Nothing is reserved (Lambda keeps 100 executions unreserved, so a reservation fails on a new
account's 10): the dispatcher (up to DispatcherConcurrency, and 2 more reading the Lambda lane's
fallback queue), the indexer (its queue's 2), the embedding function of the Lambda lane (up to
LambdaLaneConcurrency) and the query function (as many as the API lets through at once,
QueryBurstLimit) share the unreserved ones.
"""

from __future__ import annotations

from clip_pipeline.preflight.findings import Check, ClientFactory, QuotaRequest, Status
from clip_pipeline.preflight.parameters import DeployParameters

#: Functions above this much memory are refused on new accounts until AWS raises their limits.
NEW_ACCOUNT_MEMORY_MB = 3008
#: New accounts start below Lambda's default of 1,000 concurrent executions.
STANDARD_CONCURRENCY = 1000
LAMBDA_CONCURRENCY = ("lambda", "L-B99A9384")
CODES = ["lambda-concurrency", "query-burst", "lambda-memory"]


def check_lambda(client: ClientFactory, parameters: DeployParameters) -> list[Check]:
    limits = client("lambda").get_account_settings()["AccountLimit"]
    limit, unreserved = int(limits["ConcurrentExecutions"]), int(limits["UnreservedConcurrentExecutions"])
    return [
        _concurrency(parameters, limit, unreserved),
        _query_burst(parameters, unreserved),
        _memory(parameters, limit),
    ]


def _others(parameters: DeployParameters) -> int:
    """What the functions other than the dispatcher and the query function may run at once."""
    lane = parameters.number("LambdaLaneConcurrency") + parameters.lane_fallback_concurrency if parameters.lambda_lane else 0
    return parameters.indexer_concurrency + lane


def _concurrency(parameters: DeployParameters, limit: int, unreserved: int) -> Check:
    dispatcher, indexer = parameters.number("DispatcherConcurrency"), parameters.indexer_concurrency
    query = 1 if parameters.query_service else 0
    needed = dispatcher + _others(parameters) + query
    parts = (
        f"DispatcherConcurrency={dispatcher}, the indexer's {indexer}"
        + (
            f", the Lambda lane's LambdaLaneConcurrency={parameters.number('LambdaLaneConcurrency')} and "
            f"{parameters.lane_fallback_concurrency} for its fallbacks"
            if parameters.lambda_lane
            else ""
        )
        + (", the query function's 1" if query else "")
    )
    if unreserved >= needed:
        return Check(
            "lambda-concurrency",
            Status.PASS,
            f"{unreserved} unreserved concurrent executions; the stack's functions need {needed} ({parts})",
        )
    fits = unreserved - _others(parameters) - query
    return Check(
        "lambda-concurrency",
        Status.FAIL,
        f"{unreserved} unreserved concurrent executions, fewer than the {needed} the stack needs ({parts}): "
        "throttled dispatches are retried and can end in the dead-letter queue. Request more"
        + (f", or deploy with DispatcherConcurrency={fits}" if fits >= 2 else ""),
        QuotaRequest(*LAMBDA_CONCURRENCY, "Concurrent executions", limit + needed - unreserved),
    )


def _query_burst(parameters: DeployParameters, unreserved: int) -> Check:
    if not parameters.query_service:
        return Check("query-burst", Status.PASS, "no query API (QueryService=false)")
    burst = parameters.number("QueryBurstLimit")
    room = unreserved - parameters.number("DispatcherConcurrency") - _others(parameters)
    if burst <= room:
        return Check(
            "query-burst",
            Status.PASS,
            f"QueryBurstLimit={burst}: that many requests at once fit the {room} executions the other functions leave",
        )
    return Check(
        "query-burst",
        Status.WARN,
        f"QueryBurstLimit={burst} lets the API pass {burst} requests at once, but the dispatcher and the indexer leave the "
        f"query function {max(room, 0)} of the {unreserved} unreserved executions: the rest are throttled and answered 5xx "
        "(LambdaThrottlesAlarm). "
        + (
            f"Deploy with QueryBurstLimit={room}, or request more concurrent executions"
            if room >= 1
            else "Request more concurrent executions"
        ),
    )


def _memory(parameters: DeployParameters, limit: int) -> Check:
    sizes = {
        name: parameters.number(name)
        for name, present in (("QueryMemorySize", parameters.query_service), ("EmbedMemorySize", parameters.lambda_lane))
        if present
    }
    given = ", ".join(f"{name}={memory} MB" for name, memory in sizes.items()) or "no function of a size to choose"
    over = {name: memory for name, memory in sizes.items() if memory > NEW_ACCOUNT_MEMORY_MB}
    if not over:
        return Check("lambda-memory", Status.PASS, f"{given}: within every account's limit")
    if limit < STANDARD_CONCURRENCY:
        names = " and ".join(f"{name}={NEW_ACCOUNT_MEMORY_MB}" for name in over)
        return Check(
            "lambda-memory",
            Status.WARN,
            f"{given}, and this account has a new account's Lambda quotas ({limit} concurrent executions): "
            f"such accounts are often refused functions above {NEW_ACCOUNT_MEMORY_MB} MB, which fails the deploy. "
            f"Deploy with {names}, or ask AWS Support to lift the cap (it has no quota code)",
        )
    return Check("lambda-memory", Status.PASS, f"{given}; this account has Lambda's standard quotas")
