"""Test helper: the settings of a short real `asympo train` run (the tiny model in the lag runtime, a few
prompts, no model saved) and the metrics it writes."""

from __future__ import annotations

import json

from asympo.config import TrainConfig

SMALL_RUN = {
    "runtime": {"mode": "lag"},
    "rollout": {"prompts_per_step": 4, "group_size": 4},
    "task": {"test_size": 20},
    "eval_samples": 1,
    "eval_every": 0,
    "progress": False,
    "save_model": False,
}


def small_config(out, **extra) -> TrainConfig:
    """SMALL_RUN writing to `out`; each keyword replaces a top-level setting whole."""
    return TrainConfig.model_validate(SMALL_RUN | {"out": str(out)} | extra)


def read_metrics(out) -> list[dict]:
    """The complete lines of a run's metrics.jsonl (a running run may be writing the last one)."""
    text = (out / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
