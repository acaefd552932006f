"""DAPO's dynamic sampling and overlong shaping in short real `asympo train` runs: a lag run trains only on
groups with a spread and resumes exactly, overlong shaping and filtering in a run, and refills in the async
runtime. The definitions with prepared samples and the lag runtime's refills:
tests/unit/test_dynamic_sampling.py."""

from __future__ import annotations

import pytest

import asympo.trainer
from asympo.batch import make_batch
from asympo.config import TrainConfig
from asympo.trainer import train
from tests.small_runs import read_metrics, small_config


def train_config(out, **extra) -> TrainConfig:
    """A small real run with dynamic sampling on (unless `rollout` is given whole)."""
    rollout = {"prompts_per_step": 4, "group_size": 4, "dynamic_sampling": True}
    return small_config(out, **({"rollout": rollout} | extra))


metrics = read_metrics


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Four real lag-mode steps with dynamic sampling, recording what each step trained on."""
    out, trained = tmp_path_factory.mktemp("dynamic") / "straight", []

    def recording(samples, *args):
        trained.append([(s.group, s.reward) for s in samples])
        return make_batch(samples, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asympo.trainer, "make_batch", recording)
        train(train_config(out, steps=4), quiet=True)
    return out, trained


def test_a_real_lag_run_trains_only_on_groups_with_a_spread(straight_run):
    out, trained = straight_run
    steps = [m for m in metrics(out) if "reward" in m]
    assert len(steps) == 4 == len(trained)
    for m in steps:
        assert {"groups_dropped", "sampling_rounds", "groups_kept"} <= m.keys()
        assert 1 <= m["sampling_rounds"] <= 3
    assert sum(m["groups_dropped"] for m in steps) > 0, "nothing was dropped: nothing was tested"
    for batch, m in zip(trained, steps, strict=True):
        groups: dict[int, set[float]] = {}
        for gid, reward in batch:
            groups.setdefault(gid, set()).add(reward)
        assert len(groups) == m["groups_kept"] <= 4
        if m["groups_kept"]:
            assert all(len(rewards) > 1 for rewards in groups.values())


def test_a_dynamic_sampling_run_resumes_exactly(straight_run, tmp_path):
    straight = {m["step"]: m for m in metrics(straight_run[0])}
    split = tmp_path / "split"
    train(train_config(split, steps=2, checkpoint_every=2), quiet=True)
    train(train_config(split, steps=4, checkpoint_every=2, resume=True), quiet=True)
    timing = {"elapsed", "learn_time", "rollout_time", "rollout_tokens_per_s", "wait_time"}
    for m in metrics(split)[:4]:
        for key in m.keys() - timing:
            assert m[key] == straight[m["step"]][key], (m["step"], key)


def test_a_real_run_with_overlong_shaping_and_filtering(tmp_path):
    rollout_cfg = {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 2, "overlong_buffer": 1}
    cfg = train_config(tmp_path, steps=2, rollout=rollout_cfg | {"overlong_filter": True})
    result = train(cfg, quiet=True)
    assert result["skipped_steps"] == 0
    steps = [m for m in metrics(tmp_path) if "reward" in m]
    assert all({"truncated_filtered", "overlong_penalty_mean"} <= m.keys() for m in steps)
    assert sum(m["truncated_filtered"] for m in steps) > 0, "nothing was truncated: nothing was tested"
    assert all(m["truncated_filtered"] == round(m["truncated_frac"] * 16) for m in steps)


def test_dynamic_sampling_in_the_async_runtime(tmp_path):
    """The async runtime's buffer hands over more groups on a refill; the bound on rounds holds."""
    cfg = train_config(tmp_path, steps=4, runtime={"mode": "async", "max_staleness": 2})
    result = train(cfg, quiet=True)
    assert result["version"] == 4
    steps = [m for m in metrics(tmp_path) if "reward" in m]
    assert len(steps) == 4
    for m in steps:
        assert 1 <= m["sampling_rounds"] <= 3 and m["groups_kept"] <= 4
        assert m["groups_kept"] == 4 or m["sampling_rounds"] == 3  # short only when the rounds ran out
        assert max(int(k) for k in m["staleness_hist"]) <= 2
