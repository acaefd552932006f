"""The async runtime with real worker processes: bounded staleness, shared-memory weights, a worker
killed with SIGKILL is restarted, and past the restart limit the run stops cleanly."""

from __future__ import annotations

import json
import os
import signal

import pytest

from asympo.batch import make_batch
from asympo.config import ObjectiveConfig, OptimConfig, RolloutConfig, TaskConfig, TrainConfig
from asympo.data.tasks import train_stream
from asympo.faults import RunAborted
from asympo.learner import Learner
from asympo.models.load import load_policy
from asympo.rewards.exact import exact_match
from asympo.runtime import AsyncRuntime
from asympo.trainer import train

ROLLOUT = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6)


def score(items):
    return [exact_match(text, answer) for text, answer in items]


def make_runtime(max_staleness=1, max_restarts=3, rollout=ROLLOUT, **kw):
    model, tokenizer = load_policy("tiny")
    learner = Learner(model, ObjectiveConfig(name="pg"), OptimConfig(lr=1e-3, warmup_steps=0))
    runtime = AsyncRuntime(
        "tiny",
        learner.weights(),
        0,
        train_stream(TaskConfig(), 0),
        score,
        rollout,
        seed=0,
        max_staleness=max_staleness,
        max_worker_restarts=max_restarts,
        **kw,
    )
    return learner, tokenizer, runtime


def train_steps(learner, tokenizer, runtime, steps):
    seen = []
    for step in range(steps):
        samples, stats = runtime.next_batch(step)
        seen.append((learner.version, [s.version for s in samples], stats))
        learner.step(make_batch(samples, tokenizer.pad_token_id, "group_norm"))
        runtime.publish(learner.version, learner.weights())
    return seen


def test_async_staleness_is_bounded_and_new_weights_reach_the_worker():
    learner, tokenizer, runtime = make_runtime(max_staleness=1)
    try:
        seen = train_steps(learner, tokenizer, runtime, 8)
    finally:
        runtime.close()
    for version, sample_versions, stats in seen:
        assert len(sample_versions) == ROLLOUT.prompts_per_step * ROLLOUT.group_size
        assert all(0 <= version - v <= 1 for v in sample_versions)  # the admission bound holds
        assert 0.0 <= stats["worker_busy"] <= 1.0
    assert max(v for _, vs, _ in seen for v in vs) >= 4  # workers really pick up published versions
    assert runtime.cursor >= 8 * ROLLOUT.prompts_per_step  # every problem handed out is counted


@pytest.mark.parametrize("updates", ["between_jobs", "inflight"])
def test_a_sigkilled_worker_is_restarted_and_batches_keep_coming(updates):
    rollout = ROLLOUT.model_copy(update={"weight_updates": updates})
    learner, tokenizer, runtime = make_runtime(rollout=rollout)
    try:
        train_steps(learner, tokenizer, runtime, 2)
        os.kill(runtime.workers[0].process.pid, signal.SIGKILL)
        runtime.workers[0].process.join()
        seen = train_steps(learner, tokenizer, runtime, 3)
    finally:
        runtime.close()
    assert runtime.counts["worker_restarts"] == 1
    assert seen[-1][2]["worker_restarts"] == 1
    assert runtime.workers[0].process.is_alive() is False  # closed


def test_past_the_restart_limit_the_runtime_aborts_with_a_message():
    learner, tokenizer, runtime = make_runtime(max_restarts=0)
    try:
        train_steps(learner, tokenizer, runtime, 1)
        os.kill(runtime.workers[0].process.pid, signal.SIGKILL)
        runtime.workers[0].process.join()
        with pytest.raises(RunAborted, match="max_worker_restarts=0"):
            train_steps(learner, tokenizer, runtime, 1)
    finally:
        runtime.close()


def async_run(out, steps: int, **extra) -> list[dict]:
    """A small async training run; returns its per-step metrics."""
    data = {
        "runtime": {"mode": "async", "max_staleness": 2},
        "rollout": {"prompts_per_step": 4, "group_size": 4},
        "task": {"test_size": 20},
        "steps": steps,
        "eval_every": 0,
        "eval_samples": 1,
        "progress": False,
        "save_model": False,
        "out": str(out),
    }
    result = train(TrainConfig.model_validate(data | extra), quiet=True)
    assert result["version"] == steps
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "reward" in m]


def test_async_train_end_to_end_logs_async_metrics(tmp_path):
    steps = async_run(tmp_path / "run", 6)
    assert [m["step"] for m in steps] == list(range(6))
    for m in steps:
        assert set(m["staleness_hist"]) <= {"0", "1", "2"}
        assert {"buffer_groups", "worker_busy", "learner_busy", "dropped_stale", "worker_restarts"} <= set(m)


def test_async_with_learner_recomputed_behaviour_logprobs(tmp_path):
    """grpo in async with an engine that returns no log-probs: the learner scores each sample under the
    snapshot of its own version; no sample is dropped, since the store covers max_staleness + 1 versions."""
    steps = async_run(
        tmp_path / "run",
        5,
        runtime={"mode": "async", "max_staleness": 1},
        objective={"name": "grpo"},
        behaviour={"source": "learner"},
    )
    assert all(m["behaviour_dropped"] == 0 for m in steps)
    assert any(m["staleness_mean"] > 0 for m in steps)  # stale samples were really corrected
    assert all(m["loss"] is not None for m in steps)
