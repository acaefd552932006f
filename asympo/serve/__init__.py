"""`asympo serve`: an OpenAI-compatible HTTP server around the in-process engine, with a weight-reload
endpoint so a learner (here or on another machine) can push each new policy version.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/weights, GET /health.
Standard library HTTP only; concurrent requests share one continuously batched engine (see batcher.py).
"""

from __future__ import annotations

import os
import signal
import threading

import torch

from asympo.config import ServeConfig
from asympo.errors import UserError


def run_serve(cfg: ServeConfig) -> None:
    from asympo.models.device import for_engine, resolve
    from asympo.models.load import load_policy
    from asympo.serve.app import App
    from asympo.serve.server import ApiServer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:  # bind first: a busy port fails before a large model is loaded
        server = ApiServer(cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    try:
        model, tokenizer = load_policy(cfg.model)
        placement = resolve(cfg.device, cfg.precision, model)
        model = for_engine(model, placement)
    except BaseException:
        server.server_close()
        raise
    served = cfg.served_name or cfg.model
    api_key = os.environ.get(cfg.api_key_env) or None
    app = server.app = App(model, tokenizer, served, api_key, cfg.max_batch, cfg.seed, cfg.version)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = f", API key from ${cfg.api_key_env} required" if api_key else ""
    where = f"{placement.device} {placement.precision}"
    print(
        f"asympo serve: listening on http://{shown}:{port}/v1 (model {served}, version {app.version}, "
        f"{where}){auth}",
        flush=True,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown()
        app.batcher.stop()
        server.server_close()
        print("asympo serve: stopped", flush=True)
