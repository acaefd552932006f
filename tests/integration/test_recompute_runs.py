"""Learner-side behaviour log-probs in real runs: grpo with the learner's log-probs reproduces the engine's
run, and a behaviour objective trains with an engine that returns none. The snapshot store and the
recompute: tests/unit/test_recompute.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from asympo.config import TrainConfig, build_config
from asympo.trainer import train


def run(tmp_path, source: str, compare: bool) -> tuple[list[dict], dict]:
    out = tmp_path / source
    overrides = [
        "runtime.mode=lag",
        "objective=grpo",
        "steps=4",
        "prompts_per_step=8",
        "eval_every=0",
        "eval_samples=1",
    ]
    overrides += [
        "progress=false",
        f"out={out}",
        f"behaviour.source={source}",
        f"behaviour.compare={compare}",
    ]
    train(build_config(TrainConfig, None, overrides))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:-1]
    return lines, load_file(str(out / "final" / "model.safetensors"))


def test_grpo_with_learner_log_probs_reproduces_the_engine_run(tmp_path):
    engine_steps, engine_weights = run(tmp_path, "engine", compare=False)
    learner_steps, learner_weights = run(tmp_path, "learner", compare=True)
    for a, b in zip(engine_steps, learner_steps, strict=True):
        assert a["reward"] == b["reward"]  # same samples: the updates agree closely enough to sample alike
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-2)
        assert b["behaviour_lp_diff_max"] < 1e-2 and b["behaviour_dropped"] == 0
    for name, tensor in engine_weights.items():
        torch.testing.assert_close(learner_weights[name], tensor, atol=1e-4, rtol=1e-3)


def test_behaviour_objective_trains_with_an_engine_that_returns_no_log_probs(tmp_path):
    from asympo.models.load import load_policy

    steps, weights = run(tmp_path, "learner", compare=False)
    assert len(steps) == 4 and all("behaviour_lp_diff_mean" not in m for m in steps)
    assert all(m["grad_norm"] > 0 and m["skipped_steps"] == 0 for m in steps)
    start = load_policy("tiny")[0].state_dict()
    assert any(not torch.equal(weights[name], start[name]) for name in weights)  # it did train
