"""`clip-pipeline serve`: the query API on uvicorn, configured as the stack's query function is."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import uvicorn

from clip_pipeline.stack import Clients, Stack, function_environment
from clip_query.api import create_app
from clip_query.config import ConfigError, QueryConfig
from clip_query.service import QueryService
from clip_store import StorageSettings


class ServeError(RuntimeError):
    """The API cannot be served here; the message says why and what to pass instead."""


def query_config(clients: Clients, stack: Stack, pretrained: str | None, model_config: Path | None) -> QueryConfig:
    """The deployed query function's own settings, so the API here answers as the deployed one does."""
    if "QueryFunctionName" in stack.outputs:
        environment = function_environment(clients, stack, "QueryFunctionName")
    else:
        environment = {"OUTPUT_BUCKET": stack.output("OutputBucketName"), **stack.worker_environment}
    # The image's weight cache is not on this machine; open_clip's own cache (or --pretrained) serves.
    environment.pop("CLIP_CACHE_DIR", None)
    if pretrained:
        environment["CLIP_PRETRAINED"] = pretrained
    if model_config:
        environment["CLIP_MODEL_CONFIG"] = str(model_config.resolve())
    try:
        return QueryConfig.from_env(environment)
    except ConfigError as exc:
        raise ServeError(str(exc)) from exc


def listen(host: str, port: int) -> socket.socket:
    """A socket already listening, so a client that connects as soon as the URL is printed waits in the
    backlog for uvicorn instead of being refused."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}; pass --port 0 for a free port") from exc
    return listener


def url_of(host: str, listener: socket.socket) -> str:
    return f"http://{host}:{listener.getsockname()[1]}/"


def serve(config: QueryConfig, s3: Any, model: Any, listener: socket.socket, storage: StorageSettings) -> None:
    """Until Ctrl-C."""
    service = QueryService(config, s3, model, storage)
    server = uvicorn.Server(uvicorn.Config(create_app(config, service), log_level="warning", access_log=False))
    server.run(sockets=[listener])
