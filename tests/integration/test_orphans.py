"""No process outlives its run (asympo.lifetime): a run's parent is SIGKILLed at a random moment of training,
alone or with its whole process group, as a scheduler or the OOM killer would; within 15 s none of the run's
processes may be left (torchrun's agent and ranks, rollout workers, reward helpers, study cells, the local Ray
and its actors), nor a shared-memory segment, and `resume=true` finishes the run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.census import marked, settle

EXTRA_ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}  # with the test's census marker, read late
SMALL = [
    "runtime.lag=1",
    "eval_samples=1",
    "eval_every=0",
    "task.test_size=20",
    "rollout.prompts_per_step=8",
    "rollout.group_size=4",
    "progress=false",
    "checkpoint_every=2",
]
KILLS = ["parent", "group"]


def start(*args: str) -> subprocess.Popen:
    """`asympo ARGS` as a scheduler starts it: a process group (and session) of its own."""
    command = [sys.executable, "-m", "asympo", *args]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ | EXTRA_ENV,
        start_new_session=True,
    )


def finish(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "asympo", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | EXTRA_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def wait_for(ready, run: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert run.poll() is None, f"the run ended before the kill: {run.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not get going in time"
        time.sleep(0.2)
    time.sleep(random.uniform(0.0, 1.5))  # somewhere in a step, not at its edge


def shared_memory() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def kill(run: subprocess.Popen, how: str, census: str, shm_before: set[str]) -> None:
    """SIGKILL the run's parent (or its process group): its processes must all be gone within 15 s."""
    assert len(marked(census)) > 1, "the run should have children to leave behind"
    if how == "group":
        os.killpg(run.pid, signal.SIGKILL)
    else:
        os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    left = settle(census, 15.0)
    assert not left, "left behind:\n" + "\n".join(left)
    assert not shared_memory() - shm_before, f"shared memory left: {shared_memory() - shm_before}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The 2-rank lag run the killed-and-resumed ones must equal bit for bit."""
    out = tmp_path_factory.mktemp("uninterrupted")
    finish("train", "learner.processes=2", "runtime.mode=lag", *SMALL, "steps=10", f"out={out}")
    return load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize("how", KILLS)
def test_torchrun_ranks_end_with_their_launcher_and_resume_is_exact(tmp_path, how, census, uninterrupted):
    args = ["train", "learner.processes=2", "runtime.mode=lag", *SMALL, "steps=10", f"out={tmp_path}"]
    shm = shared_memory()
    run = start(*args)
    wait_for(lambda: (tmp_path / "checkpoints" / "latest").exists(), run)
    kill(run, how, census, shm)
    finish(*args, "resume=true")
    resumed = load_file(tmp_path / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)


@pytest.mark.parametrize("how", KILLS)
def test_async_rollout_workers_and_reward_helpers_end_with_the_trainer(tmp_path, how, census):
    args = ["train", "runtime.mode=async", "runtime.workers=2", *SMALL, "steps=40", f"out={tmp_path}"]
    shm = shared_memory()
    run = start(*args)
    wait_for(lambda: steps_logged(tmp_path) >= 3, run)
    kill(run, how, census, shm)
    finish(*args, "resume=true")
    assert json.loads((tmp_path / "result.json").read_text())["version"] == 40


@pytest.mark.parametrize("ranks", [1, 2], ids=["rollout-actors", "and-learner-ranks"])
def test_a_local_ray_and_its_actors_end_with_the_driver(tmp_path, census, ranks):
    """Rollout actors, and with learner.processes=2 a follower rank as a Ray actor too (learner.launcher=auto
    picks Ray beside Ray rollouts): the reaper takes the local Ray down with every actor."""
    args = ["train", "runtime.mode=async", "runtime.backend=ray", "runtime.ray_num_cpus=2", *SMALL]
    args += ["steps=40", f"learner.processes={ranks}", f"out={tmp_path}"]
    shm = shared_memory()
    run = start(*args)
    wait_for(lambda: steps_logged(tmp_path) >= 3, run)
    kill(run, "parent", census, shm)
    finish(*args, "resume=true")
    assert json.loads((tmp_path / "result.json").read_text())["version"] == 40


@pytest.mark.parametrize("how", KILLS)
def test_study_cells_end_with_the_study(tmp_path, how, census):
    out = tmp_path / "s"
    args = ["study", "objectives=[pg,asympo]", "lags=[1]", "lrs=[1e-4]", "seeds=[0]", "workers=2"]
    args += ["base.steps=60", "base.eval_every=0", "base.rollout.prompts_per_step=4", "base.eval_samples=1"]
    args += ["base.task.test_size=20", "base.task.validation_size=20", "progress=false", f"out={out}"]
    shm = shared_memory()
    run = start(*args)
    cells = out / "cells"
    wait_for(lambda: cells.exists() and sum(steps_logged(c) >= 2 for c in cells.glob("*")) == 2, run)
    kill(run, how, census, shm)
    finish(*args)
    assert (out / "results.md").exists()
    assert len(list(cells.glob("*/result.json"))) == 2
