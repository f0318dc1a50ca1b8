"""The HTTP API: the same FastAPI application behind API Gateway (lambda_function.py) and on a laptop
(`clip-pipeline serve`).

Each route reads its request (inputs.py), runs the service's work on the model threads, never on the
event loop, and answers with a model of models.py; those models and each route's declared request
body make /openapi.json. middleware.py names, logs and limits every request and gives each error
code its status: the service below knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

from clip_query import inputs
from clip_query.config import QueryConfig
from clip_query.errors import Code, QueryError, invalid, shown
from clip_query.middleware import REQUEST_ID, RequestContext, error_response
from clip_query.models import (
    INPUT_FIELDS,
    ClassifyAnswer,
    ClassifyRequest,
    EmbedAnswer,
    EmbedRequest,
    ErrorAnswer,
    Health,
    LabelScore,
    SearchAnswer,
    SearchInUse,
    SearchParameters,
    SearchRequest,
    SearchResult,
    Similarity,
    SimilarityAnswer,
    request_schema,
)
from clip_query.service import QueryService
from clip_store import Match as Nearest
from clip_worker.labels import PROMPT

T = TypeVar("T")
PAGE = resources.files("clip_query").joinpath("static/index.html").read_text(encoding="utf-8")
router = APIRouter()


async def get_service(request: Request) -> QueryService:
    # async: FastAPI would run a plain function on its thread pool, a thread hop per request.
    return request.app.state.service


Service = Annotated[QueryService, Depends(get_service)]


async def off_loop(request: Request, work: Callable[..., T], *args: Any) -> T:
    # The request's context (its id, the log keys) goes along to the thread.
    call = functools.partial(contextvars.copy_context().run, work, *args)
    return await asyncio.get_running_loop().run_in_executor(request.app.state.model_threads, call)


# ---------------------------------------------------------------------------------------------
# what /openapi.json says of requests and refusals

REFUSED: dict[str, Any] = {"model": ErrorAnswer}
BAD_REQUEST: dict[int | str, dict[str, Any]] = {
    400: {**REFUSED, "description": "a malformed request or one over a limit; `error.code` says which"}
}
POST_REFUSALS: dict[int | str, dict[str, Any]] = {
    **BAD_REQUEST,
    408: {**REFUSED, "description": "request-timeout: the body took longer than BODY_TIMEOUT_SECONDS to arrive"},
    413: {**REFUSED, "description": "body-too-large: over MAX_BODY_BYTES"},
    415: {**REFUSED, "description": "unsupported-type (an input that is no image it embeds) or unsupported-media-type"},
}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The operation's body, JSON or multipart, from its request model (the route reads it itself, so
    that both shapes reach the same checks): in a form, the options are fields of their names, and
    every other part an image file or, where the endpoint takes texts, a text."""
    schema = request_schema(model)
    image = {"type": "string", "format": "binary", "description": "an image file"}
    part = {"anyOf": [image, {"type": "string", "description": "a text"}]} if "texts" in model.model_fields else image
    form = {
        "type": "object",
        "properties": {name: value for name, value in schema["properties"].items() if name not in INPUT_FIELDS},
        "additionalProperties": part,
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}},
        }
    }


def query_parameters(model: type[BaseModel]) -> dict[str, Any]:
    schema = request_schema(model)
    return {
        "parameters": [
            {"name": name, "in": "query", "required": name in schema.get("required", ()), "schema": value}
            for name, value in schema["properties"].items()
        ]
    }


# ---------------------------------------------------------------------------------------------
# answers


def described(service: QueryService) -> dict[str, Any]:
    return {"request_id": REQUEST_ID.get(), **service.describe()}


def vector_json(vector: Any) -> list[float]:
    return [float(value) for value in vector]


def similarity_json(cosine: float) -> Similarity:
    """The cosine, and the 0-100 score CLIP demos show: 100 x cosine, negatives as 0."""
    return Similarity(cosine=round(cosine, 6), score=round(100 * max(cosine, 0.0), 2))


def search_answer(
    service: QueryService, query: dict[Literal["text", "image"], str], matches: list[Nearest], indexed: int
) -> SearchAnswer:
    results = [
        SearchResult(rank=rank, url=match.url, score=round(match.score, 6), preview=service.preview(match.url))
        for rank, match in enumerate(matches, 1)
    ]
    return SearchAnswer(**described(service), query=query, indexed=indexed, results=results)


# ---------------------------------------------------------------------------------------------
# routes


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def demo_page() -> HTMLResponse:
    return HTMLResponse(PAGE)


@router.get("/health")
async def health(service: Service) -> Health:
    search = service.search_in_use()
    return Health(
        **described(service), status="ok", indexed=service.store.count(), search=SearchInUse(**search) if search else None
    )


@router.post("/embed", responses=POST_REFUSALS, openapi_extra=request_body(EmbedRequest))
async def embed(request: Request, service: Service) -> list[float] | EmbedAnswer:
    """`{"text"}` or `{"image"}` -> the bare vector; anything else -> every vector, keyed by the caller's names."""
    found = await inputs.read(request, EmbedRequest, service.config)
    if not found.count:
        raise invalid("nothing to embed: send text, image, texts or images (or form fields)")
    done = await off_loop(request, service.vectors, found.texts, found.images, found.options.truncate)
    vectors = {**done.texts, **done.images}
    if found.single:
        return vector_json(next(iter(vectors.values())))
    return EmbedAnswer(**described(service), vectors={name: vector_json(vector) for name, vector in vectors.items()})


@router.post("/similarity", responses=POST_REFUSALS, openapi_extra=request_body(EmbedRequest))
async def similarity(request: Request, service: Service) -> SimilarityAnswer:
    """The cosine similarity of every text with every image, and the same scaled 0-100."""
    found = await inputs.read(request, EmbedRequest, service.config)
    for kind, given in (("texts", found.texts), ("images", found.images)):
        if not given:
            raise invalid(f"similarity needs at least one text and one image; the request has no {kind}", kind)
    done = await off_loop(request, service.vectors, found.texts, found.images, found.options.truncate)
    cosines = service.similarity(done)
    return SimilarityAnswer(
        **described(service),
        similarity={text: {image: similarity_json(cosine) for image, cosine in row.items()} for text, row in cosines.items()},
    )


@router.post("/classify", responses=POST_REFUSALS, openapi_extra=request_body(ClassifyRequest))
async def classify(request: Request, service: Service) -> ClassifyAnswer:
    """Images and, optionally, labels -> each image's top labels (zero-shot, "a photo of a {label}")."""
    found = await inputs.read(request, ClassifyRequest, service.config)
    if found.texts:
        name = next(iter(found.texts))
        raise invalid(f"classify takes images and a labels option, not texts ('{shown(name)}')", name)
    if not found.images:
        raise invalid("classify needs an image (JSON image/images, or a file field)", "image")
    done = await off_loop(request, service.classify, found.images, found.options.labels, found.options.top_k)
    return ClassifyAnswer(
        **described(service),
        prompt=PROMPT,
        label_set=done.label_set,
        labels_compared=done.labels_compared,
        images={
            name: [
                LabelScore(label=label.label, score=round(label.score, 6), probability=round(label.probability, 6))
                for label in labels
            ]
            for name, labels in done.images.items()
        },
    )


@router.get("/search", responses=BAD_REQUEST, openapi_extra=query_parameters(SearchParameters))
async def search_text(request: Request, service: Service) -> SearchAnswer:
    """`?q=<text>&k=10`: the stored images nearest to a text."""
    parameters = inputs.search_parameters(request, service.config)
    done = await off_loop(request, service.vectors, {"q": parameters.q}, {}, parameters.truncate)
    matches, indexed = await off_loop(request, service.search, done.texts["q"], parameters.k)
    return search_answer(service, {"text": parameters.q}, matches, indexed)


@router.post("/search", responses=POST_REFUSALS, openapi_extra=request_body(SearchRequest))
async def search_image(request: Request, service: Service) -> SearchAnswer:
    """One image (or one text) in the body -> the stored images nearest to it."""
    found = await inputs.read(request, SearchRequest, service.config)
    if found.count != 1:
        raise invalid(f"search takes exactly one image or text; the request has {found.count}", "image")
    k = inputs.check_k(found.options.k, service.config)
    done = await off_loop(request, service.vectors, found.texts, found.images, found.options.truncate)
    ((name, vector),) = [*done.texts.items(), *done.images.items()]
    matches, indexed = await off_loop(request, service.search, vector, k)
    kind: Literal["text", "image"] = "text" if done.texts else "image"
    return search_answer(service, {kind: name}, matches, indexed)


# ---------------------------------------------------------------------------------------------
# the application


async def query_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, QueryError)
    return error_response(error)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's own Allow names only the first route's).
    The app's own routes (/openapi.json, /docs) and this module's, which FastAPI nests in one entry."""
    return sorted(
        {
            method
            for route in [*request.app.router.routes, *router.routes]
            if getattr(route, "methods", None) and route.matches(request.scope)[0] is not Match.NONE
            for method in route.methods
        }
    )


async def http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    path = shown(request.url.path)
    if error.status_code == 405:
        allowed = ", ".join(allowed_methods(request))
        refusal = QueryError(Code.METHOD_NOT_ALLOWED, f"{shown(request.method)} is not allowed on {path}; use {allowed}")
        return error_response(refusal, headers={"Allow": allowed})
    if error.status_code == 404:
        return error_response(QueryError(Code.NOT_FOUND, f"there is nothing at {path}"))
    return error_response(invalid(f"{shown(request.method)} {path}: {shown(error.detail)}"))


def create_app(config: QueryConfig, service: QueryService) -> FastAPI:
    app = FastAPI(
        title="CLIP query API",
        summary="Embed texts and images, compare them, label images zero-shot and search the stored vectors.",
        description="Limits, error codes and examples: docs/query-api.md.",
        version="1",
    )
    app.state.service = service
    # The model runs on these threads, never on the event loop. They live as long as the app: on
    # Lambda, Mangum's loop per event would otherwise start (and torch warm up) a new thread per
    # invocation. Their number bounds how many requests run the model at once.
    app.state.model_threads = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="model")
    app.include_router(router)
    app.add_exception_handler(QueryError, query_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(RequestContext, max_body_bytes=config.max_body_bytes, body_timeout_s=config.body_timeout_s)
    return app
