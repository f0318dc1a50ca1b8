"""The HTTP edge every request passes: its id, its log line, its body limit, and the one place an
error code becomes an HTTP status.

Every response carries the request's id (the caller's `X-Request-Id` or `request_id` header, or a
new UUID) in an `X-Request-Id` header, JSON bodies carry it as `request_id`, and so does every log
line written while the request runs. Refusals are JSON `{"request_id", "error": {"code",
"message", "field", "limit"...}}` with the status STATUS gives their code.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from contextvars import ContextVar

from aws_lambda_powertools import Logger
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_query.errors import Code, QueryError, invalid, shown

logger = Logger(service="clip-query")
# Powertools writes the JSON lines itself; a handler that open_clip's root-level logging calls add
# later (logging.basicConfig) would print every line a second time, unformatted, on stderr.
logging.getLogger(logger.name).propagate = False
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
#: Request headers a caller may name its request with, in order of preference.
REQUEST_ID_HEADERS = (b"x-request-id", b"request_id", b"request-id")
MAX_REQUEST_ID_CHARS = 128

STATUS: dict[Code, int] = {
    Code.INVALID_REQUEST: 400,
    Code.INVALID_BASE64: 400,
    Code.INVALID_TEXT: 400,
    Code.TOO_MANY_ITEMS: 400,
    Code.TOO_MANY_LABELS: 400,
    Code.OVER_LIMIT: 400,
    Code.TEXT_TOO_LONG: 400,
    Code.TOO_MANY_PIXELS: 400,
    Code.CORRUPT_IMAGE: 400,
    Code.TOO_COSTLY: 400,
    Code.NOT_FOUND: 404,
    Code.METHOD_NOT_ALLOWED: 405,
    Code.REQUEST_TIMEOUT: 408,
    Code.BODY_TOO_LARGE: 413,
    Code.UNSUPPORTED_TYPE: 415,
    Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.INTERNAL_ERROR: 500,
}


def error_response(error: QueryError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"request_id": REQUEST_ID.get(), "error": error.body()}, status_code=STATUS[error.code], headers=headers)


def request_id(headers: dict[bytes, bytes]) -> str:
    """The caller's id if it is one a header can carry back (printable ASCII), else a new UUID."""
    given = next((headers[name].decode("latin-1") for name in REQUEST_ID_HEADERS if headers.get(name)), "")
    given = given[:MAX_REQUEST_ID_CHARS]
    return given if given.isascii() and given.isprintable() and given.strip() else str(uuid.uuid4())


def declared_length(headers: dict[bytes, bytes]) -> int:
    value = headers.get(b"content-length", b"").strip()
    if not value:
        return 0
    if not value.isdigit() or len(value) > 18:
        raise invalid(f"Content-Length {value[:20]!r} is not a byte count", "content-length")
    return int(value)


class RequestContext:
    """The outermost layer: names the request, logs it, limits its body (in size, and in the time it
    may take to arrive) and turns any surprise into a JSON 500 that still carries the request id (so
    no response ever lacks one)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        named = request_id(headers)
        REQUEST_ID.set(named)
        logger.thread_safe_append_keys(request_id=named)
        started = time.monotonic()
        status = 500
        received = 0
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # what follows the body is the wait for a disconnect, which has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, started + self.body_timeout_s - time.monotonic()))
            except TimeoutError:
                raise QueryError(
                    Code.REQUEST_TIMEOUT,
                    f"the body did not arrive within {self.body_timeout_s:g} s ({received} bytes came)",
                    limit=self.body_timeout_s,
                    unit="seconds",
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if max(declared_length(headers), received) > self.max_body_bytes:
                raise QueryError(
                    Code.BODY_TOO_LARGE, f"the body is over the limit of {self.max_body_bytes} bytes", limit=self.max_body_bytes
                )
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", named.encode("ascii"))]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer JSON
            logger.exception("request failed", extra={"path": scope["path"]})
            failure = QueryError(Code.INTERNAL_ERROR, f"the request failed unexpectedly; quote request id {named}")
            await error_response(failure)(scope, receive, send_with_id)
        finally:
            logger.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": shown(scope["path"], 200),
                    "status": status,
                    "duration_ms": round(1000 * (time.monotonic() - started), 1),
                },
            )
            logger.thread_safe_remove_keys(["request_id"])
