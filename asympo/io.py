"""Small file helpers: writable output folders and atomic writes (temp file, fsync, rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.errors import UserError


def ensure_writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"output folder {path} is not writable: {e.strerror or e}") from None
    return path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write the model folder next to its destination, then swap it in: a crash never leaves half a model.
    A peft model writes its adapter there and the merged model in `merged/` (asympo.lora.save_pretrained)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config"):
        from asympo.lora import save_pretrained

        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp / "merged")
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.rglob("*"):
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
