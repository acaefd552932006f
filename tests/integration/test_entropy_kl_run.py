"""A short real run logs the token entropy and the KL to a frozen reference to metrics.jsonl and to
TensorBoard. The estimators, the penalty and the learner's reference: tests/unit/test_entropy_kl.py."""

from __future__ import annotations

import json
import math

import pytest


def test_a_run_logs_entropy_and_kl_to_metrics_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from asympo.config import TrainConfig
    from asympo.trainer import train

    cfg = TrainConfig.model_validate(
        {
            "model": "tiny",
            "steps": 3,
            "eval_every": 0,
            "eval_samples": 1,
            "task": {"test_size": 10},
            "rollout": {"prompts_per_step": 4, "group_size": 4},
            "runtime": {"mode": "sync"},
            "objective": {"name": "asympo", "kl_coef": 0.1},
            "tensorboard": True,
            "progress": False,
            "save_model": False,
            "checkpoint_every": 0,
            "out": str(tmp_path),
        }
    )
    train(cfg, quiet=True)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in steps if "reward" in m]
    vocab = 100  # the tiny model's vocabulary: entropy lies in (0, log V)
    assert len(trained) == 3 and all(0 < m["entropy"] < math.log(vocab) for m in trained)
    assert trained[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6) and all(m["kl_ref"] >= 0 for m in trained)
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"entropy", "kl_ref"} <= set(events.Tags()["scalars"])
