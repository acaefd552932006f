"""A reasoning-gym task end to end: `asympo train` scores rollouts with the dataset's own scorer in the reward
guard's process, and `asympo eval` reports on its held-out split."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asympo.trainer import train
from tests.small_runs import read_metrics, small_config

pytest.importorskip("reasoning_gym")
TASK = {"name": "reasoning_gym:chain_sum", "size": 300, "test_size": 20, "options": {"max_terms": 2}}


def test_a_run_on_a_reasoning_gym_task_is_scored_by_its_scorer(tmp_path):
    result = train(small_config(tmp_path, steps=3, task=TASK), quiet=True)
    assert result["version"] == 3 and result["reward_errors"] == 0 and result["reward_timeouts"] == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["reward"] == "reasoning_gym" and config["task"]["options"] == {"max_terms": 2}
    assert len([m for m in read_metrics(tmp_path) if "reward" in m]) == 3


def test_eval_on_a_reasoning_gym_task(tmp_path):
    out = tmp_path / "eval.json"
    args = ["task.name=reasoning_gym:chain_sum", "task.size=300", "task.test_size=10", "k=2", "greedy=false"]
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "eval", *args, "progress=false", f"json_out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["problems"] == 10 and result["reward_errors"] == 0 and 0 <= result["pass@1"] <= 1
