"""Multi-turn episodes in real runs: the calculator learns in the lag runtime and resumes exactly, the async
runtimes (local processes, Ray actors) train on episodes, and bad environment settings are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serving import Server

from asympo.trainer import train
from tests.small_runs import read_metrics, small_config

CALC = {
    "model": "tiny-calc",
    "env": {"name": "calculator"},
    "task": {"operands": 3, "ops": "+-", "test_size": 40},
    "rollout": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 24},
    "eval_samples": 2,
}
TIMING = {"elapsed", "learn_time", "rollout_time", "rollout_tokens_per_s", "wait_time"}


def test_the_calculator_environment_raises_accuracy_and_tool_use(tmp_path):
    result = train(small_config(tmp_path, steps=25, **CALC), quiet=True)
    assert result["accuracy_after"] > result["accuracy_before"] + 0.2, result
    assert result["env_used_tool_after"] > result["env_used_tool_before"] + 0.2, result
    assert result["env_turns_after"] > result["env_turns_before"], result
    steps = [m for m in read_metrics(tmp_path) if "reward" in m]
    assert all(m["env_errors"] == 0 and 1 <= m["env_turns"] <= 2 for m in steps)


def test_lag_resume_with_an_environment_continues_exactly(tmp_path):
    calc = CALC | {"runtime": {"mode": "lag", "lag": 1}, "eval_samples": 1}
    train(small_config(tmp_path / "straight", steps=4, **calc), quiet=True)
    train(small_config(tmp_path / "split", steps=2, checkpoint_every=2, **calc), quiet=True)
    train(small_config(tmp_path / "split", steps=4, checkpoint_every=2, resume=True, **calc), quiet=True)
    straight = {m["step"]: m for m in read_metrics(tmp_path / "straight")}
    split = read_metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(5))
    for m in split[:4]:
        for key in m.keys() - TIMING:
            assert m[key] == straight[m["step"]][key], (m["step"], key)


@pytest.mark.parametrize("backend", ["local", "local-inflight", "ray"])
def test_async_runtimes_train_on_episodes(tmp_path, backend):
    runtime = {"mode": "async", "backend": backend.partition("-")[0], "workers": 1, "max_staleness": 2}
    calc = CALC
    if backend == "ray":
        pytest.importorskip("ray")
        runtime |= {"ray_num_cpus": 2}
    if backend == "local-inflight":  # a turn may span versions: every token keeps its own
        calc = CALC | {"rollout": CALC["rollout"] | {"weight_updates": "inflight"}}
    result = train(small_config(tmp_path, steps=6, runtime=runtime, **calc), quiet=True)
    steps = [m for m in read_metrics(tmp_path) if "reward" in m]
    assert len(steps) == 6 and result["version"] == 6
    assert all("env_used_tool" in m and m["env_turns"] >= 1 for m in steps)
    assert max(m["env_used_tool"] for m in steps) > 0


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asympo", "train", "steps=1", "progress=false", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["env.name=calculater"], "env.name='calculater': expected one of 'calculator', 'guess'"),
        (["env.name=guess", "env.args.low=5", "env.args.high=1"], "low (5) must be below high (1)"),
        (["env.name=calculator", "env.step_timeout=0"], "env.step_timeout"),
        (["env.name=calculator", "rollout.overlong_buffer=4"], "rollout.overlong_buffer with env.name"),
        (["env.max_turns=0"], "env.max_turns"),
    ],
)
def test_bad_environment_settings_are_one_line_errors(tmp_path, args, words):
    done = cli(f"out={tmp_path}", *args)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_openai_engine_plays_episodes_through_asympo_serve(tmp_path):
    """Text only: each turn goes out as token ids and comes back as text, tokenized once; the stop string
    that ended a tool call comes back in `stop_reason` and is kept."""
    server = Server("model=tiny-calc")
    try:
        rollout = CALC["rollout"] | {"engine": "openai", "openai": {"base_url": server.url}}
        calc = CALC | {"rollout": rollout, "runtime": {"mode": "sync"}}
        result = train(small_config(tmp_path, steps=25, **calc), quiet=True)
    finally:
        server.stop()
    assert result["accuracy_after"] > result["accuracy_before"] + 0.2, result
    assert result["env_used_tool_after"] > result["env_used_tool_before"] + 0.2, result
    steps = [m for m in read_metrics(tmp_path) if "reward" in m]
    assert steps[-1]["env_tool_calls"] > 0.5 and all(m["env_errors"] == 0 for m in steps)


def test_eval_scores_episodes_and_reports_success_and_turns(tmp_path):
    out = tmp_path / "eval.json"
    args = ["model=tiny-calc", "env.name=calculator", "task.operands=3", "task.ops=+-", "task.test_size=40"]
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "eval", *args, "max_new_tokens=24", "k=4", f"json_out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert 1 < result["env_turns"] < 2 and 0 < result["env_used_tool"] < 1
    # the warm start gets a problem right when it uses the tool, almost never without it
    assert abs(result["pass@1"] - result["env_used_tool"]) < 0.1, result
