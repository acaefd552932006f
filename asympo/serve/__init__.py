"""`asympo serve`: an OpenAI-compatible HTTP server around the in-process engine, with a weight-reload
endpoint so a learner (here or on another machine) can push each new policy version.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/weights, GET /health.
HTTP is Starlette on uvicorn (the `serve` extra, see server.py); concurrent requests share one continuously
batched engine thread (see batcher.py).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import torch

from asympo.config import ServeConfig
from asympo.errors import UserError


def api_key_from(name: str) -> str | None:
    """The key in `$name`: unset means no key; set but empty (or only spaces) is a mistake, refused at
    start-up rather than silently turning auth off. Surrounding spaces (a key pasted from a file) are
    stripped."""
    value = os.environ.get(name)
    if value is None:
        return None
    key = value.strip()
    if not key:
        raise UserError(f"${name} is set but empty: unset it to serve without a key, or give it a key")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise UserError(f"${name} holds spaces or control characters inside the key: it could never be sent")
    return key


def run_serve(cfg: ServeConfig) -> None:
    try:
        import uvicorn

        from asympo.serve.server import (
            BACKLOG,
            KEEP_ALIVE,
            MAX_HEADER_BYTES,
            SHUTDOWN_GRACE,
            AsgiApp,
            Protocol,
            bind,
        )
    except ImportError as e:
        raise UserError(
            f"asympo serve needs the 'serve' extra ({e.name} is missing): pip install 'asympo[serve]'"
        ) from None
    from asympo.models.device import for_engine, resolve
    from asympo.models.load import load_policy
    from asympo.serve.app import App

    api_key = api_key_from(cfg.api_key_env)
    weights_dir = None
    if cfg.weights_dir:
        weights_dir = Path(cfg.weights_dir).expanduser()
        if not weights_dir.is_dir():
            raise UserError(f"weights_dir is not a folder: {cfg.weights_dir}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:  # bind first: a busy port fails before a large model is loaded
        sock = bind(cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    try:
        model, tokenizer = load_policy(cfg.model)
        placement = resolve(cfg.device, cfg.precision, model)
        model = for_engine(model, placement)
        served = cfg.served_name or cfg.model
        app = App(model, tokenizer, served, api_key, cfg.max_batch, cfg.seed, cfg.version, weights_dir)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    asgi = AsgiApp(app, cfg.body_timeout)
    config = uvicorn.Config(
        asgi,
        http=type("Protocol", (Protocol,), {"header_timeout": cfg.header_timeout}),
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

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = f", API key from ${cfg.api_key_env} required" if api_key else ""
    where = f"{placement.device} {placement.precision}"
    banner = (
        f"asympo serve: listening on http://{shown}:{port}/v1 (model {served}, version {app.version}, "
        f"{where}){auth}"
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
