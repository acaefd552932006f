"""`asympo train` with rollout.engine=vllm, on a real vLLM: every runtime, a weight update for every version
the runtime generates with, and runs with and without engine log-probs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asympo.config import TrainConfig, build_config
from asympo.rollout.vllm import VLLMEngine

SMALL = [
    "rollout.engine=vllm",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "task.test_size=4",
    "eval_samples=1",
    "progress=false",
    "save_model=false",
    "checkpoint_every=0",
    "eval_every=0",
]


@pytest.fixture()
def loads(monkeypatch):
    """The versions each run's vLLM engine was given, in order."""
    seen: list[int] = []
    real = VLLMEngine.load_weights

    def record(self, state_dict, version):
        seen.append(version)
        return real(self, state_dict, version)

    monkeypatch.setattr(VLLMEngine, "load_weights", record)
    return seen


@pytest.mark.parametrize(
    ("mode", "extra", "expected"),
    [
        # sync: each step generates with the newest weights, so every version after 0 is loaded
        ("sync", ["objective.name=grpo"], [1, 2, 3]),
        # async with behaviour.source=learner: no engine log-probs; the newest version before each request
        ("async", ["objective.name=grpo", "behaviour.source=learner"], None),
    ],
)
def test_train_in_process(mode, extra, expected, tmp_path, loads):
    from asympo.trainer import train

    overrides = [f"runtime.mode={mode}", "steps=4", f"out={tmp_path}", *SMALL, *extra]
    result = train(build_config(TrainConfig, None, overrides), quiet=True)
    assert result["steps"] == 4 and result["version"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4
    if expected is not None:
        assert loads == expected
    else:
        assert loads and loads == sorted(set(loads)) and loads[-1] <= 3  # newer versions, in order


def test_the_cli_lag_run_loads_every_version(tmp_path):
    """`python -m asympo train`: vLLM's engine process is spawned from the CLI (the entry point's guard),
    and at lag 1 the steps generate with versions 0, 0, 1, 2, 3 (staleness 0, then 1)."""
    args = [sys.executable, "-m", "asympo", "train", "runtime.mode=lag", "runtime.lag=1", "steps=5"]
    done = subprocess.run([*args, f"out={tmp_path}", *SMALL], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stale = [r["staleness_hist"] for r in rows if "staleness_hist" in r]
    assert stale == [{"0": 4}, {"1": 4}, {"1": 4}, {"1": 4}, {"1": 4}]
    assert json.loads((tmp_path / "result.json").read_text())["version"] == 5


def test_a_script_without_a_main_guard_is_told_why(tmp_path):
    """vLLM spawns its engine process, which re-imports the main script: unguarded, the child would start vLLM
    again. It stops with the guard's name instead, and the parent with a one-line error."""
    script = tmp_path / "unguarded.py"
    script.write_text("from asympo.rollout.vllm import VLLMEngine\n\nVLLMEngine('tiny').close()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert 'put the script\'s training call under `if __name__ == "__main__":`' in done.stderr
    assert "vLLM could not start the policy" in done.stderr.strip().splitlines()[-1]


def test_the_engine_process_ends_with_a_sigkilled_trainer(tmp_path):
    """vLLM starts its engine as our child and leaves it running if we die: asympo's reaper ends it (and all
    under it) within 15 s of a SIGKILL of the trainer, mid-training. Found by a marker in its environment."""
    import os
    import secrets
    import signal
    import time

    from tests.census import MARK, marked, settle

    mark = secrets.token_hex(8)
    args = [sys.executable, "-m", "asympo", "train", "runtime.mode=lag", "steps=400", f"out={tmp_path}"]
    run = subprocess.Popen(
        [*args, *SMALL],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ | {MARK: mark},
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert run.poll() is None, run.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert len(marked(mark)) > 1  # the trainer and vLLM's engine process (and the reaper)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    left = settle(mark, 15.0)
    assert not left, "left behind:\n" + "\n".join(left)
