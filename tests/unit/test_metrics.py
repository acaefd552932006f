"""Metrics: metrics.jsonl, TensorBoard and the rollout metrics. W&B offline:
tests/integration/test_metrics_wandb.py."""

from __future__ import annotations

import json

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
