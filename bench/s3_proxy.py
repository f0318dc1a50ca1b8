"""A counting HTTP proxy in front of moto's S3, for what sets a query's latency on real S3.

LanceDB reads S3 with its own Rust client, so boto3's hooks never see its requests; a proxy on the
endpoint sees every one. Each request is recorded with its method, path, response bytes and start
and end times, so a phase's requests can be counted and its sequential depth computed: the
longest chain of requests each of which started after the previous one had finished, which is
how many S3 round trips a query waits for one after another however many it sends at once.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# Hop-by-hop headers are the proxy's own business, not the forwarded request's.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    response_bytes: int
    started: float
    ended: float


@dataclass(frozen=True)
class Phase:
    requests: int
    gets: int
    bytes: int
    #: The longest chain of requests that waited for one another (S3 round trips in sequence).
    sequential: int


def sequential_depth(requests: list[Request]) -> int:
    depth: list[int] = []
    ordered = sorted(requests, key=lambda r: r.started)
    for index, request in enumerate(ordered):
        before = [depth[j] for j in range(index) if ordered[j].ended <= request.started]
        depth.append(1 + max(before, default=0))
    return max(depth, default=0)


def summarise(requests: list[Request]) -> Phase:
    return Phase(
        requests=len(requests),
        gets=sum(r.method == "GET" for r in requests),
        bytes=sum(r.response_bytes for r in requests),
        sequential=sequential_depth(requests),
    )


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        target = urlparse(upstream)
        if target.hostname is None or target.port is None:
            raise ValueError(f"{upstream!r} is not an http://host:port endpoint")
        host, port = target.hostname, target.port
        self.requests: list[Request] = []
        lock = threading.Lock()
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # one line per request would drown the bench's output
                pass

            def _forward(self) -> None:
                started = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                connection = http.client.HTTPConnection(host, port, timeout=120)
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                connection.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                # A HEAD's Content-Length describes the object, not this (empty) body.
                declared = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
                self.send_header("Content-Length", declared or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                with lock:
                    recorded.append(Request(self.command, self.path, response.status, len(payload), started, time.monotonic()))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def between(self, start: float, end: float) -> list[Request]:
        return [r for r in self.requests if start <= r.started and r.ended <= end]
