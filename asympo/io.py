"""Small file helpers: writable output folders and atomic writes (temp file, fsync, rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
