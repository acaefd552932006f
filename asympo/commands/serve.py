"""`asympo serve`: an OpenAI-compatible HTTP server around the in-process engine, with a weight-reload
endpoint so a learner (here or on another machine) can push each new policy version (asympo.serve)."""

from __future__ import annotations

from pathlib import Path

import torch

from asympo.config import ServeConfig
from asympo.errors import UserError
from asympo.models.device import for_engine, resolve
from asympo.models.load import load_policy
from asympo.sft import ensure_tiny

PRESET_HUB_IDS = {"smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct",)}  # what clients call the presets


def run(cfg: ServeConfig) -> None:
    try:  # the `serve` extra: Starlette, uvicorn, h11
        from asympo.serve.app import App, api_key_from
        from asympo.serve.server import BACKLOG, bind, run_server
    except ImportError as e:
        raise UserError(
            f"asympo serve needs the 'serve' extra ({e.name} is missing): pip install 'asympo[serve]'"
        ) from None
    api_key = api_key_from(cfg.api_key_env)
    weights_dir = Path(cfg.weights_dir).expanduser() if cfg.weights_dir else None
    if weights_dir is not None and not weights_dir.is_dir():
        raise UserError(f"weights_dir is not a folder: {cfg.weights_dir}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:  # bind first: a busy port fails before a large model is loaded
        sock = bind(cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    try:
        ensure_tiny(cfg.model)
        model, tokenizer = load_policy(cfg.model)
        placement = resolve(cfg.device, cfg.precision, model)
        model = for_engine(model, placement)
        served = served_names(cfg)
        template = read_template(cfg.chat_template)
        app = App(
            model, tokenizer, served, api_key, cfg.max_batch, cfg.seed, cfg.version, weights_dir, template
        )
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = f", API key from ${cfg.api_key_env} required" if api_key else ""
    where = f"{placement.device} {placement.precision}"
    banner = (
        f"asympo serve: listening on http://{shown}:{port}/v1 (model {', '.join(served)}, "
        f"version {app.version}, "
        f"{where}){auth}"
    )
    run_server(app, sock, cfg.header_timeout, cfg.body_timeout, banner, cfg.access_log)


def served_names(cfg: ServeConfig) -> tuple[str, ...]:
    """The names requests may ask for: the configured ones, or the model setting (and a preset's hub id)."""
    if cfg.served_name:
        names = [cfg.served_name] if isinstance(cfg.served_name, str) else cfg.served_name
    else:
        names = [cfg.model, *PRESET_HUB_IDS.get(cfg.model, ())]
    return tuple(dict.fromkeys(n.strip() for n in names))


def read_template(path: str) -> str | None:
    if not path:
        return None
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read chat_template {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text.strip():
        raise UserError(f"chat_template {path} is empty")
    return text
