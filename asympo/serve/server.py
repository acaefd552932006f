"""HTTP plumbing with the standard library: a thread per connection, JSON in and out, OpenAI-style errors."""

from __future__ import annotations

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from asympo.serve.app import App, Request
from asympo.serve.errors import ApiError

MAX_BODY = 16 * 2**20  # completions are small; only /v1/weights carries a model


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive at shutdown
    allow_reuse_address = True

    app: App  # set once the model is loaded; requests are served only after that (serve_forever)

    def __init__(self, host: str, port: int):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    server_version = "asympo-serve"

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        try:
            body = self._read_body()  # always read, so a refused upload never breaks the connection
            url = urlsplit(self.path)
            request = Request(method, url.path, dict(parse_qsl(url.query)), self.headers, body)
            status, payload = self.server.app.handle(request)
        except ApiError as e:
            status, payload = e.status, e.body()
        except Exception as e:  # a bug, not the client's fault: say so, keep serving
            print(
                f"asympo serve: internal error on {method} {self.path}: {type(e).__name__}: {e}",
                file=sys.stderr,
            )
            status, payload = (
                500,
                ApiError(500, f"internal error: {type(e).__name__}", "internal_error").body(),
            )
        self._send(status, payload)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.isdigit():
            raise ApiError(400, "bad Content-Length header", "invalid_request")
        size = int(length)
        if size > MAX_BODY and not self.path.startswith("/v1/weights"):
            self.close_connection = True  # the body stays unread: this connection cannot be reused
            raise ApiError(413, f"request body over {MAX_BODY // 2**20} MB", "too_large")
        return self.rfile.read(size)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to tell it

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one line per request would drown a training run's output (and never show headers)."""
