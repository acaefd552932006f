"""`asympo sft`: the tiny model's supervised warm start on the built-in task (asympo.sft)."""

from __future__ import annotations

from asympo.config import SFTConfig
from asympo.sft import run_sft


def run(cfg: SFTConfig) -> dict:
    return run_sft(cfg)
