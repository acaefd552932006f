"""HTTP plumbing: Starlette on uvicorn (HTTP/1.1 with keep-alive, h11), JSON in and out, OpenAI-style errors.

Per request, in this order: the request line and headers are parsed by h11 (at most `MAX_HEADER_BYTES`,
within `HEADER_TIMEOUT` seconds); `App.route` checks path, key and method and picks the route's body limit; a
declared `Content-Length` over it is a 413 at once; the body is read in the chunks the server receives,
counted against the limit, each within `BODY_TIMEOUT` seconds; only then does the endpoint run, in a worker
thread.
Errors of the HTTP layer itself (a bad request line, oversized headers, a bad `Content-Length`) are answered
with the same JSON shape by `Protocol`. At shutdown the listener closes, waiting requests get a 503 and
requests already decoding finish.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from types import FrameType
from typing import Any, TextIO
from urllib.parse import parse_qsl

import anyio
import h11
import uvicorn
from starlette.datastructures import Headers
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from asympo.serve.app import App, Request
from asympo.serve.errors import ApiError
from asympo.serve.streaming import Stream

BACKLOG = 2048  # the listen queue: bursts of new connections wait here instead of being reset
HEADER_TIMEOUT = 10.0  # seconds from connecting (or the end of the last reply) to the end of the headers
BODY_TIMEOUT = 30.0  # seconds the body may pause between two chunks
KEEP_ALIVE = 30.0  # an idle keep-alive connection is closed after this many seconds
MAX_HEADER_BYTES = 16 * 2**10  # request line plus headers; more is a 431
WORKERS = 128  # endpoints running at once (each waits for the engine thread in its own worker thread)
SHUTDOWN_GRACE = 10  # seconds requests already decoding get to finish when the server stops


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (a busy port fails before a model is loaded) and listening once
    `listen()` is called."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def json_reply(status: int, payload: dict, close: bool = False) -> Response:
    headers = {"Connection": "close"} if close else None
    return Response(json.dumps(payload).encode(), status, headers, media_type="application/json")


class AsgiApp:
    """The ASGI application: checks before reading, reads in bounded chunks, runs the endpoint in a thread,
    and writes one access-log line per request (`log`: where to; None: off)."""

    def __init__(self, app: App, body_timeout: float = BODY_TIMEOUT, log: TextIO | None = None):
        self.app, self.body_timeout, self.log = app, body_timeout, log
        self.limiter = anyio.CapacityLimiter(WORKERS)
        self.stopping = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # uvicorn runs with lifespan off; answer politely anyway
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        response = await self._respond(scope, receive)
        if isinstance(response, Stream):
            await self._send_stream(response, receive, send)
            if self.log is not None:
                usage = await anyio.to_thread.run_sync(response.usage, limiter=self.limiter)
                self._log(scope, 200, started, usage, "stream dropped" if response.dropped else "stream")
            return
        await response(scope, receive, send)
        self._log(
            scope,
            response.status_code,
            started,
            getattr(response, "usage", None),
            getattr(response, "reason", ""),
        )

    def _log(self, scope: dict, status: int, started: float, usage: dict | None, note: str) -> None:
        """Method, path, status, latency and tokens; a refusal's reason. Never a header, a key or a body."""
        if self.log is None:
            return
        ms = (time.perf_counter() - started) * 1000
        tokens = f" tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" if usage else ""
        path = scope.get("path", "")[:200].encode("unicode_escape").decode()
        line = f"asympo serve: {scope.get('method', '-')[:16]} {path} {status} {ms:.1f}ms{tokens}"
        if note:
            line += f" {note}"
        print(line, file=self.log, flush=True)

    async def _send_stream(self, stream: Stream, receive: Any, send: Any) -> None:
        """Server-Sent Events as the engine produces them. A client that goes away cancels its sequences,
        which frees their slots at the engine's next step."""
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        try:
            async with anyio.create_task_group() as group:

                async def until_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    stream.dropped = True
                    stream.cancel()
                    group.cancel_scope.cancel()

                group.start_soon(until_disconnect)
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                while (
                    chunk := await anyio.to_thread.run_sync(stream.next, abandon_on_cancel=True)
                ) is not None:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        finally:
            stream.cancel()  # nothing once the job has ended; otherwise its sequences stop at the next step

    async def _respond(self, scope: dict, receive: Any) -> Response | Stream:
        headers = Headers(scope=scope)
        unread = "content-length" in headers or "transfer-encoding" in headers  # until read to its end
        try:
            if scope.get("http_version") not in ("1.0", "1.1"):
                raise ApiError(505, "only HTTP/1.0 and HTTP/1.1 are supported", "http_version_not_supported")
            # h11 bounds headers that arrive in pieces; a block that arrives whole is measured here.
            size = len(scope.get("raw_path", b"")) + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > MAX_HEADER_BYTES:
                raise ApiError(431, "the request line and headers are too large", "headers_too_large")
            if self.stopping:
                raise ApiError(503, "the server is shutting down", "unavailable")
            query = {k: v for k, v in _query_pairs(scope.get("query_string", b""))}
            req = Request(scope["method"], scope["path"], query, headers)
            endpoint, limit = self.app.route(req)
            req.body = await self._read_body(receive, headers, limit)
            unread = False
            status, payload = await anyio.to_thread.run_sync(endpoint, self.app, req, limiter=self.limiter)
            if isinstance(payload, Stream):
                return payload
            response = json_reply(status, payload)
            response.usage = payload.get("usage")  # for the access log
            return response
        except ApiError as e:
            # A refused request may leave its body unread: close, so the next request cannot start inside it.
            # Oversized headers close too: the HTTP layer's own 431 does, and such a client gets no second go.
            response = json_reply(e.status, e.body(), close=unread or e.status >= 500 or e.status == 431)
            response.reason = f"({e.code}: {e.message[:200]})"
            return response
        except Exception as e:  # a bug, not the client's fault: say so, keep serving
            print(
                f"asympo serve: internal error on {scope.get('method')}: {type(e).__name__}: {e}",
                file=sys.stderr,
            )
            return json_reply(
                500, ApiError(500, f"internal error: {type(e).__name__}", "internal_error").body()
            )

    async def _read_body(self, receive: Any, headers: Headers, limit: int) -> bytes:
        declared = headers.get("content-length")  # h11 has already checked it is digits
        if declared is not None and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes for this path", "too_large")
        if declared is None and "transfer-encoding" not in headers:
            return b""
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                pause = f"the request body paused for over {self.body_timeout:g} s"
                raise ApiError(408, pause, "timeout") from None
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client went away before sending the whole body", "invalid_request")
            body += message.get("body", b"")
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes for this path", "too_large")
            if not message.get("more_body", False):
                return bytes(body)


def _query_pairs(raw: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(raw.decode("latin-1"), max_num_fields=32)
    except ValueError:
        raise ApiError(400, "too many query parameters", "invalid_request") from None


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON errors from the HTTP layer and a deadline for the headers (slowloris):
    a connection that has not finished its request line and headers `HEADER_TIMEOUT` seconds after it opened
    (or after its last reply) gets a 408 and is closed."""

    header_timeout = HEADER_TIMEOUT  # run_server sets the configured value on a subclass

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._protocol_error: h11.RemoteProtocolError | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        next_event = self.conn.next_event

        def remember_errors() -> Any:
            try:
                return next_event()
            except h11.RemoteProtocolError as e:
                self._protocol_error = e
                raise

        self.conn.next_event = remember_errors  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:
                self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered (pipelining): its own deadlines apply
        if self.conn.our_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.transport.close()  # nothing of a request arrived: an idle keep-alive connection
            return
        self._send_error(408, "the request headers took too long", "timeout")

    def send_400_response(self, msg: str) -> None:
        error, self._protocol_error = self._protocol_error, None
        status = error.error_status_hint if error is not None else 400
        if status == 431:
            self._send_error(431, "the request line and headers are too large", "headers_too_large")
        elif status == 501:
            self._send_error(501, "this Transfer-Encoding is not supported", "not_implemented")
        else:
            reason = str(error)[:200] if error is not None else "malformed"
            self._send_error(400, f"invalid HTTP request: {reason}", "invalid_request")

    def _send_error(self, status: int, message: str, code: str) -> None:
        """An error answered by the HTTP layer, in the API's JSON shape, after which the connection closes.
        Written as raw bytes: h11 may already be in its error state and refuse to send a response."""
        body = ApiError(status, message, code).encoded()
        reason = h11_reason(status)
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()


class InProcess:
    """`app` served on 127.0.0.1 from a daemon thread of this process: a training run serving its live
    engine (the verifiers adapter), and the tests. `url` is the base URL (`.../v1`); `close()` stops the
    server and the app's engine thread."""

    def __init__(self, app: App, start_timeout: float = 30.0):
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.sock.listen(BACKLOG)
        config = uvicorn.Config(
            AsgiApp(app),
            http=type("Protocol", (Protocol,), {"header_timeout": HEADER_TIMEOUT}),
            loop="asyncio",
            lifespan="off",
            log_config=None,
            log_level="error",
            access_log=False,
            # longer than a client's own idle expiry (httpx: 5 s), so the client always closes first: a server
            # closing an idle connection as a client reuses it fails that request (uvicorn's default is 5 s)
            timeout_keep_alive=int(KEEP_ALIVE),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="asympo-serve", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.app.batcher.stop()
        self.sock.close()


def h11_reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def run_server(
    app: App,
    sock: socket.socket,
    header_timeout: float,
    body_timeout: float,
    banner: str,
    access_log: bool = True,
) -> None:
    """Serve `app` on the bound socket until SIGINT/SIGTERM: stop accepting, answer waiting requests
    with a 503, let the ones decoding finish (`SHUTDOWN_GRACE`), exit 0. `banner` is printed once the
    signal handlers are in place."""
    asgi = AsgiApp(app, body_timeout, sys.stderr if access_log else None)
    config = uvicorn.Config(
        asgi,
        http=type("Protocol", (Protocol,), {"header_timeout": header_timeout}),
        proxy_headers=False,
        loop="asyncio",
        lifespan="off",
        log_config=None,
        log_level="error",  # the HTTP layer's refusals are answered in JSON, not logged
        access_log=False,
        backlog=BACKLOG,
        timeout_keep_alive=int(KEEP_ALIVE),
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        server_header=False,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            """Stop accepting, answer waiting requests with a 503; no re-raised signal (exit code 0)."""
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            asgi.stopping = True
            app.batcher.close()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            """Say "listening" only once the signal handlers are in place: a SIGTERM sent on that line must
            take the graceful path, not the default one that kills the process mid-request."""
            await super().startup(sockets=sockets)
            print(banner, flush=True)

    server = Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn holds SIGINT/SIGTERM only while it serves and then puts back what it found. What it finds is
        # this handler, so a signal just before it starts or while the process winds down is a clean stop
        # too, never the default that kills the process mid-request with -15.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
    try:
        server.run(sockets=[sock])
    finally:
        asgi.stopping = True
        app.batcher.stop()
        sock.close()
        print("asympo serve: stopped", flush=True)
        if threading.current_thread() is threading.main_thread():
            # Python puts its own handlers back to the default while the interpreter exits; an ignored signal
            # it leaves alone, so a repeated SIGTERM cannot turn the finished stop into -15.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
