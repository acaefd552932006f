"""Checkpoints and faults with real processes: exact resume, SIGKILL at a random point, SIGTERM,
a hanging reward, injected NaNs, and a corrupt checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import asympo.learner
from asympo.checkpoint import load_checkpoint
from asympo.config import TrainConfig
from asympo.errors import UserError
from asympo.faults import RunAborted
from asympo.learner import Learner
from asympo.models.load import load_policy
from asympo.trainer import train
from tests.small_runs import read_metrics, small_config

SMALL = [
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "task.test_size=20",
    "eval_samples=1",
    "eval_every=0",
    "progress=false",
    "save_model=false",
]
TIMING = {"elapsed", "learn_time", "rollout_time", "rollout_tokens_per_s", "wait_time", "recompute_time"}


config, metrics = small_config, read_metrics


def steps_of(out) -> list[int]:
    return [m["step"] for m in metrics(out) if "reward" in m]


def cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "asympo", "train", *SMALL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.parametrize("switch_at", [0, 2])  # 2: each batch also loads the newest version mid-generation
def test_lag_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, switch_at):
    runtime = {"mode": "lag", "lag": 2, "lag_switch_at": switch_at}
    train(config(tmp_path / "straight", steps=6, runtime=runtime), quiet=True)
    train(config(tmp_path / "split", steps=3, checkpoint_every=3, runtime=runtime), quiet=True)
    result = train(
        config(tmp_path / "split", steps=6, checkpoint_every=3, resume=True, runtime=runtime), quiet=True
    )
    assert result["version"] == 6
    straight = {m["step"]: m for m in metrics(tmp_path / "straight")}
    split = metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(7))  # no step twice, the old final eval dropped
    for m in split[:6]:
        for key in m.keys() - TIMING:
            assert m[key] == straight[m["step"]][key], (m["step"], key)


def wait_for_steps(out, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len(steps_of(out)) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


@pytest.mark.parametrize("mode", ["lag", "async", "async-inflight"])
def test_sigkill_at_a_random_point_then_resume_completes(tmp_path, mode):
    out, rng = tmp_path / "run", random.Random()
    args = [f"out={out}", f"runtime.mode={mode.partition('-')[0]}", "steps=60", "checkpoint_every=2"]
    if mode == "async-inflight":  # workers take new weights between decode steps
        args += ["rollout.weight_updates=inflight"]
    proc = cli(*args)
    kill_at = rng.randint(1, 20)  # a random step, then a random instant within it
    wait_for_steps(out, kill_at, proc)
    delay = rng.uniform(0, 0.2)
    time.sleep(delay)
    assert proc.poll() is None, "finished before the kill: nothing was tested"
    workers = children(proc.pid)
    proc.kill()  # SIGKILL: no handler runs, a checkpoint may be half written
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "orphaned child processes"
    resumed = subprocess.run(
        [sys.executable, "-m", "asympo", "train", *SMALL, *args, "resume=true"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, f"killed at step {kill_at} + {delay:.2f}s: {resumed.stderr}"
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 60 and result["version"] == 60
    assert steps_of(out) == list(range(60)), f"killed at step {kill_at} + {delay:.2f}s"
    model, _ = load_policy("tiny")
    learner = Learner(model, TrainConfig().objective, TrainConfig().optim)
    state, _ = load_checkpoint(out / "checkpoints", model, learner.optimizer, learner.scheduler)
    assert state.step == 60 and state.version == 60
    assert state.cursor == 60 * 4 if mode == "lag" else state.cursor >= 60 * 4


def children(pid: int) -> list[int]:
    """Child processes of `pid`, read from /proc (rollout workers, the reward helper)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


@pytest.mark.parametrize("mode", ["lag", "async"])
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, mode):
    out = tmp_path / "run"
    proc = cli(f"out={out}", "steps=200", "checkpoint_every=0", f"runtime.mode={mode}")
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM at step" in stderr and "resume=true" in stderr
    assert "Traceback" not in stderr
    done = steps_of(out)
    model, _ = load_policy("tiny")
    learner = Learner(model, TrainConfig().objective, TrainConfig().optim)
    state, _ = load_checkpoint(out / "checkpoints", model, learner.optimizer, learner.scheduler)
    assert state.step == len(done) == done[-1] + 1


def test_sigterm_while_waiting_for_a_stuck_worker_stops_at_once(tmp_path):
    """A worker that stops producing (here: SIGSTOP) must not keep a SIGTERM from ending the run."""
    out = tmp_path / "run"
    proc = cli(f"out={out}", "steps=200", "checkpoint_every=0", "runtime.mode=async")
    wait_for_steps(out, 2, proc)
    stuck = [max(children(proc.pid), key=rss)]  # the rollout worker: the child that holds a model
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(3)  # the learner has used up the buffer and is waiting for rollouts
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM at step" in stderr and "Traceback" not in stderr
    assert (out / "checkpoints" / "latest").exists()


def test_a_corrupt_checkpoint_on_resume_is_a_one_line_error_and_nothing_is_deleted(tmp_path):
    out = tmp_path / "run"
    train(config(out, steps=2, checkpoint_every=1), quiet=True)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    (latest / "model.safetensors").write_bytes(b"not a safetensors file")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "asympo", "train", *SMALL, f"out={out}", "steps=4", "resume=true"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "corrupt" in lines[0] and latest.name in lines[0], proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "result.json").exists()  # the finished run's files are untouched


def test_resume_past_the_requested_steps_is_refused(tmp_path):
    out = tmp_path / "run"
    train(config(out, steps=3, checkpoint_every=3), quiet=True)
    with pytest.raises(UserError, match="step 3, past steps=2"):
        train(config(out, steps=2, resume=True), quiet=True)
    assert (out / "checkpoints" / "step-000003").is_dir()


def test_a_hanging_reward_times_out_gives_zero_and_the_run_completes(tmp_path, monkeypatch):
    module = tmp_path / "hanging_reward.py"
    module.write_text(
        "import pathlib, time\n"
        f"MARK = pathlib.Path({str(tmp_path / 'hung')!r})\n"
        "def reward(text, answer):\n"
        "    if not MARK.exists():\n"
        "        MARK.touch()\n"
        "        time.sleep(3600)\n"
        "    return float(text.strip() == answer)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    start = time.monotonic()
    cfg = config(tmp_path / "run", steps=2, reward="hanging_reward:reward", faults={"reward_timeout": 3.0})
    result = train(cfg, quiet=True)
    assert result["reward_timeouts"] == 1 and result["version"] == 2
    assert time.monotonic() - start < 120


def poison(monkeypatch, calls: set[int]) -> None:
    """Inject NaN into the learner's log-probs on the given scoring forward calls (0-based): the step's
    pass, which also gives the token entropy."""
    real, count = asympo.learner.score_tokens, [-1]

    def score_tokens(*args, **kwargs):
        logprobs, entropies = real(*args, **kwargs)
        entropy = args[5] if len(args) > 5 else kwargs.get("entropy")
        if not entropy:  # another pass (a reference's, a proximal policy's): not the step's
            return logprobs, entropies
        count[0] += 1
        return (logprobs * float("nan") if count[0] in calls else logprobs), entropies

    monkeypatch.setattr(asympo.learner, "score_tokens", score_tokens)


def test_injected_nan_skips_the_step_and_keeps_the_weights(tmp_path, monkeypatch):
    poison(monkeypatch, {1})
    result = train(config(tmp_path / "run", steps=4), quiet=True)
    assert result["skipped_steps"] == 1 and result["version"] == 3
    versions = [m["version"] for m in metrics(tmp_path / "run") if "reward" in m]
    assert versions == [1, 1, 2, 3]  # the poisoned step did not advance the policy


def test_repeated_nan_stops_the_run_with_a_final_checkpoint(tmp_path, monkeypatch):
    poison(monkeypatch, {1, 2, 3, 4, 5, 6})
    with pytest.raises(RunAborted, match="max_skipped_steps=2.*checkpoint"):
        train(config(tmp_path / "run", steps=10, faults={"max_skipped_steps": 2}), quiet=True)
    model, _ = load_policy("tiny")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    learner = Learner(model, TrainConfig().objective, TrainConfig().optim)
    state, _ = load_checkpoint(tmp_path / "run" / "checkpoints", model, learner.optimizer, learner.scheduler)
    assert state.step == 4 and state.version == 1 and state.skipped_steps == 3
    assert any(not torch.equal(reference[k], v) for k, v in model.state_dict().items())  # step 0 counted
