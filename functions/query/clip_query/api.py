"""The HTTP API: the same FastAPI application behind API Gateway (lambda_function.py) and on a laptop
(`clip-pipeline serve`).

Every response carries the request's id (the caller's `X-Request-Id` or `request_id` header, or a
new UUID) in an `X-Request-Id` header, JSON bodies carry it as `request_id`, and so does every log
line written while the request runs. Refusals are JSON `{"request_id", "error": {"code",
"message", "field", "limit"...}}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from importlib import resources
from typing import Any, TypeVar

from aws_lambda_powertools import Logger
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_query import inputs
from clip_query.config import QueryConfig
from clip_query.inputs import ApiError, Inputs, invalid
from clip_query.service import QueryService
from clip_worker.index import Match
from clip_worker.labels import PROMPT, Label

logger = Logger(service="clip-query")
# Powertools writes the JSON lines itself; a handler that open_clip's root-level logging calls add
# later (logging.basicConfig) would print every line a second time, unformatted, on stderr.
logging.getLogger(logger.name).propagate = False
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
T = TypeVar("T")
#: Request headers a caller may name its request with, in order of preference.
REQUEST_ID_HEADERS = (b"x-request-id", b"request_id", b"request-id")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"request_id": REQUEST_ID.get(), "error": error.body()}, status_code=error.status)


class RequestContext:
    """The outermost layer: names the request, logs it, limits its body and turns any surprise into
    a JSON 500 that still carries the request id (so no response ever lacks one)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = next((headers[name].decode("latin-1") for name in REQUEST_ID_HEADERS if headers.get(name)), "")
        request_id = given[:128] or str(uuid.uuid4())
        REQUEST_ID.set(request_id)
        logger.thread_safe_append_keys(request_id=request_id)
        started = time.monotonic()
        status = 500
        declared = int(headers.get(b"content-length", b"0") or 0)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if max(declared, received) > self.max_body_bytes:
                raise ApiError(
                    413, "body-too-large", f"the body is over the limit of {self.max_body_bytes} bytes", limit=self.max_body_bytes
                )
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer JSON
            logger.exception("request failed", extra={"path": scope["path"]})
            failure = ApiError(500, "internal-error", f"the request failed unexpectedly; quote request id {request_id}")
            await error_response(failure)(scope, receive, send_with_id)
        finally:
            logger.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(1000 * (time.monotonic() - started), 1),
                },
            )
            logger.thread_safe_remove_keys(["request_id"])


def vector_json(vector: Any) -> list[float]:
    return [float(value) for value in vector]


def similarity_json(cosine: float) -> dict[str, float]:
    """The cosine, and the 0-100 score CLIP demos show: 100 x cosine, negatives as 0."""
    return {"cosine": round(cosine, 6), "score": round(100 * max(cosine, 0.0), 2)}


def label_json(label: Label) -> dict[str, Any]:
    return {"label": label.label, "score": round(label.score, 6), "probability": round(label.probability, 6)}


def create_app(config: QueryConfig, service: QueryService) -> FastAPI:
    app = FastAPI(
        title="CLIP query API",
        summary="Embed texts and images, compare them, label images zero-shot and search the stored vectors.",
        version="1",
    )
    page = resources.files("clip_query").joinpath("static/index.html").read_text(encoding="utf-8")
    # The model runs on these threads, never on the event loop. They live as long as the app: on
    # Lambda, Mangum's loop per event would otherwise start (and torch warm up) a new thread per
    # invocation. Their number bounds how many requests run the model at once.
    model_threads = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="model")

    async def off_loop(work: Callable[..., T], *args: Any) -> T:
        # The request's context (its id, the log keys) goes along to the thread.
        call = functools.partial(contextvars.copy_context().run, work, *args)
        return await asyncio.get_running_loop().run_in_executor(model_threads, call)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(error.status_code, "http-error")
        return error_response(ApiError(error.status_code, code, f"{request.method} {request.url.path}: {error.detail}"))

    def answer(content: Any) -> JSONResponse:
        if isinstance(content, dict):
            content = {"request_id": REQUEST_ID.get(), **content}
        return JSONResponse(content)

    async def vectors(found: Inputs) -> dict[str, Any]:
        truncate = found.flag("truncate")

        def work() -> tuple[dict[str, Any], dict[str, Any]]:
            return service.text_vectors(found.texts, truncate), service.image_vectors(found.images)

        texts, images = await off_loop(work)
        return {"texts": texts, "images": images}

    def results(matches: list[Match], indexed: int) -> dict[str, Any]:
        return {
            "indexed": indexed,
            "results": [
                {"rank": rank, "url": match.url, "score": round(match.score, 6), "preview": service.preview(match.url)}
                for rank, match in enumerate(matches, 1)
            ],
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        return answer({"status": "ok", **service.describe(), "indexed": service.index.loaded()})

    @app.post("/embed")
    async def embed(request: Request) -> JSONResponse:
        """`{"text"}` or `{"image"}` -> the bare vector; anything else -> every vector, keyed by the caller's names."""
        found = await inputs.read(request, config.max_items)
        if not found.count:
            raise invalid("nothing to embed: send text, image, texts or images (or form fields)")
        done = await vectors(found)
        if found.single:
            (vector,) = [*done["texts"].values(), *done["images"].values()]
            return answer(vector_json(vector))
        keyed = {**done["texts"], **done["images"]}
        return answer({**service.describe(), "vectors": {name: vector_json(keyed[name]) for name in keyed}})

    @app.post("/similarity")
    async def similarity(request: Request) -> JSONResponse:
        """The cosine similarity of every text with every image, and the same scaled 0-100."""
        found = await inputs.read(request, config.max_items)
        for kind, given in (("texts", found.texts), ("images", found.images)):
            if not given:
                raise invalid(f"similarity needs at least one text and one image; the request has no {kind}", kind)
        done = await vectors(found)
        return answer(
            {
                **service.describe(),
                "similarity": {
                    text: {image: similarity_json(float(text_vector @ image_vector)) for image, image_vector in done["images"].items()}
                    for text, text_vector in done["texts"].items()
                },
            }
        )

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        """Images and, optionally, labels -> each image's top labels (zero-shot, "a photo of a {label}")."""
        found = await inputs.read(request, config.max_items)
        if found.texts:
            name = next(iter(found.texts))
            raise invalid(f"classify takes images and a labels option, not texts ({name!r})", name)
        if not found.images:
            raise invalid("classify needs an image (JSON image/images, or a file field)", "image")
        requested = found.labels(config.max_labels)
        top_k = found.integer("top_k", config.top_k, config.max_labels)

        def work() -> tuple[dict[str, list[Label]], int]:
            labels = service.label_set(requested)
            return service.classify(service.image_vectors(found.images), labels, top_k), len(labels.labels)

        ranked, label_count = await off_loop(work)
        return answer(
            {
                **service.describe(),
                "prompt": PROMPT,
                "label_set": "request" if requested else config.labels,
                "labels_compared": label_count,
                "images": {name: [label_json(label) for label in labels] for name, labels in ranked.items()},
            }
        )

    @app.get("/search")
    async def search_text(request: Request) -> JSONResponse:
        """`?q=<text>&k=10`: the stored images nearest to a text."""
        parameters = request.query_params
        text = parameters.get("q", "")
        if not text.strip():
            raise invalid("q is missing: GET /search?q=a+red+bicycle&k=10", "q")
        options = Inputs(options={name: parameters[name] for name in ("k", "truncate") if name in parameters})
        k = options.integer("k", 10, config.max_results)
        truncate = options.flag("truncate")

        def work() -> tuple[list[Match], int]:
            return service.search(service.text_vectors({"q": text}, truncate)["q"], k)

        return answer({"query": {"text": text}, **service.describe(), **results(*await off_loop(work))})

    @app.post("/search")
    async def search_image(request: Request) -> JSONResponse:
        """One image (or one text) in the body -> the stored images nearest to it."""
        found = await inputs.read(request, config.max_items)
        if found.count != 1:
            raise invalid(f"search takes exactly one image or text; the request has {found.count}", "image")
        k = found.integer("k", 10, config.max_results)
        done = await vectors(found)
        ((name, vector),) = [*done["texts"].items(), *done["images"].items()]
        kind = "text" if done["texts"] else "image"
        matches, indexed = await off_loop(service.search, vector, k)
        return answer({"query": {kind: name}, **service.describe(), **results(matches, indexed)})

    app.add_middleware(RequestContext, max_body_bytes=config.max_body_bytes)
    return app
