"""The stack's Lambda functions against the account's concurrency and memory limits.

Nothing is reserved (Lambda keeps 100 executions unreserved, so a reservation fails on a new
account's 10): the dispatcher (up to DispatcherConcurrency), the indexer (its queue's 2) and the
query function (as many as the API lets through at once, QueryBurstLimit) share the unreserved ones.
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


def _concurrency(parameters: DeployParameters, limit: int, unreserved: int) -> Check:
    dispatcher, indexer = parameters.number("DispatcherConcurrency"), parameters.indexer_concurrency
    query = 1 if parameters.query_service else 0
    needed = dispatcher + indexer + query
    parts = f"DispatcherConcurrency={dispatcher}, the indexer's {indexer}" + (", the query function's 1" if query else "")
    if unreserved >= needed:
        return Check(
            "lambda-concurrency",
            Status.PASS,
            f"{unreserved} unreserved concurrent executions; the stack's functions need {needed} ({parts})",
        )
    fits = unreserved - indexer - query
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
    room = unreserved - parameters.number("DispatcherConcurrency") - parameters.indexer_concurrency
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
    memory = parameters.number("QueryMemorySize")
    if not parameters.query_service or memory <= NEW_ACCOUNT_MEMORY_MB:
        return Check(
            "lambda-memory",
            Status.PASS,
            f"QueryMemorySize={memory} MB is within every account's limit"
            if parameters.query_service
            else "no query function (QueryService=false)",
        )
    if limit < STANDARD_CONCURRENCY:
        return Check(
            "lambda-memory",
            Status.WARN,
            f"QueryMemorySize={memory} MB, and this account has a new account's Lambda quotas ({limit} concurrent executions): "
            f"such accounts are often refused functions above {NEW_ACCOUNT_MEMORY_MB} MB, which fails the deploy. "
            f"Deploy with QueryMemorySize={NEW_ACCOUNT_MEMORY_MB}, or ask AWS Support to lift the cap (it has no quota code)",
        )
    return Check("lambda-memory", Status.PASS, f"QueryMemorySize={memory} MB; this account has Lambda's standard quotas")
