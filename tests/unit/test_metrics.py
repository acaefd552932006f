"""Metrics: metrics.jsonl, TensorBoard and the rollout metrics. W&B offline:
tests/integration/test_metrics_wandb.py."""

from __future__ import annotations

import json

import pytest

from asympo.metrics import MetricsLog, rollout_metrics
from asympo.rollout.base import Sample


def test_jsonl_one_line_per_step_non_finite_as_null_and_old_runs_kept(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "old": true}\n')
    log = MetricsLog(tmp_path)
    log.log(0, {"reward": 0.5, "loss": float("nan")})
    log.log(1, {"reward": 0.75, "staleness_hist": {"2": 4}})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 0, "reward": 0.5, "loss": None},
        {"step": 1, "reward": 0.75, "staleness_hist": {"2": 4}},
    ]
    assert json.loads((tmp_path / "metrics.1.jsonl").read_text()) == {"step": 0, "old": True}
    MetricsLog(tmp_path).close()  # a third run keeps both earlier files
    assert (tmp_path / "metrics.2.jsonl").exists() and (tmp_path / "metrics.1.jsonl").exists()


def test_tensorboard_receives_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, tensorboard=True)
    for step, reward in enumerate([0.25, 0.5, 0.75]):
        log.log(step, {"reward": reward, "staleness_hist": {"0": 8}})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(0, 0.25), (1, 0.5), (2, 0.75)]


def test_rollout_metrics_staleness_histogram_and_truncation():
    def sample(version, reward, n_tokens, reason):
        return Sample("1+1=", [1], [5] * n_tokens, "2", reason, version, None, reward=reward)

    stats = rollout_metrics([sample(3, 1.0, 2, "stop"), sample(1, 0.0, 8, "length")], learner_version=3)
    assert stats["staleness_hist"] == {"0": 1, "2": 1} and stats["staleness_mean"] == 1.0
    assert stats["reward"] == 0.5 and stats["truncated_frac"] == 0.5 and stats["response_len"] == 5.0


def spanning(version: int, token_versions: list[int] | None, version_end: int | None) -> Sample:
    n = len(token_versions) if token_versions else 3
    return Sample(
        "p", [1], [2] * n, "t", "stop", version, token_versions=token_versions, version_end=version_end
    )


def test_the_staleness_split_adds_up_and_spans_are_counted():
    """In-flight updates: staleness from the oldest token = versions published while generating + while
    queued; a response spans newest - oldest token versions."""
    samples = [
        spanning(3, [3, 3, 4, 5], 5),  # began at 3, took 4 and 5 in flight, finished at 5
        spanning(5, None, 6),  # one version, but 6 was published while it was generated
        spanning(6, None, None),  # lag/sync runtimes: nothing recorded beyond its version
    ]
    m = rollout_metrics(samples, learner_version=7)
    assert m["staleness_mean"] == (4 + 2 + 1) / 3
    assert (m["staleness_inflight_mean"], m["staleness_inflight_max"]) == ((2 + 1 + 0) / 3, 2)
    assert (m["staleness_queue_mean"], m["staleness_queue_max"]) == ((2 + 1 + 1) / 3, 2)
    assert m["staleness_mean"] == pytest.approx(m["staleness_inflight_mean"] + m["staleness_queue_mean"])
    assert (m["version_span_mean"], m["version_span_max"], m["spanning_frac"]) == (2 / 3, 2, 1 / 3)
