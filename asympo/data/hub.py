"""Datasets through the `datasets` library: a hub id (`openai/gsm8k`) or a local dataset folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hub_constants

from asympo.errors import UserError
from asympo.models.hub import hub_reachable


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Make `datasets` read only its local cache, for when the hub cannot be reached."""
    import datasets.config  # the `real` extra

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def dataset_records(name: str, subset: str | None, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"dataset '{name}' needs the datasets package: pip install 'asympo[real]'") from None
    datasets.disable_progress_bars()
    cache_only = not Path(name).is_dir() and not hub_reachable()
    try:
        with offline() if cache_only else contextlib.nullcontext():
            data = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # datasets raises many types (connection, missing split, bad files)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if cache_only:
            reason = "not in the local cache and the hub cannot be reached (offline?)"
        raise UserError(f"cannot load dataset '{name}' split '{split}': {reason}") from None
    for index, record in enumerate(data, 1):
        yield f"{name}[{split}] row {index}", record
