"""Several optimiser updates per rollout batch in a real lag-mode run: versions count updates and a run
resumes exactly at a batch boundary. The mini-batches and the objectives within a batch:
tests/unit/test_minibatches.py."""

from __future__ import annotations

from asympo.trainer import train
from tests.small_runs import read_metrics, small_config

TIMING = {"elapsed", "learn_time", "rollout_time", "rollout_tokens_per_s", "reward_time"}


def test_a_lag_run_with_two_updates_per_batch_counts_versions_and_resumes_exactly(tmp_path):
    """Versions count updates (2 per batch), rollouts stay exactly k = 1 version behind, and a run
    checkpointed at a batch boundary then resumed logs what the straight run logged."""
    extra = {"runtime": {"mode": "lag", "lag": 1}, "optim": {"minibatches": 2}}
    train(small_config(tmp_path / "straight", steps=4, **extra), quiet=True)
    train(small_config(tmp_path / "split", steps=2, checkpoint_every=2, **extra), quiet=True)
    result = train(
        small_config(tmp_path / "split", steps=4, checkpoint_every=2, resume=True, **extra), quiet=True
    )
    assert result["version"] == 8
    straight = {m["step"]: m for m in read_metrics(tmp_path / "straight")}
    trained = [m for m in read_metrics(tmp_path / "split") if "reward" in m]
    assert [m["step"] for m in trained] == [0, 1, 2, 3]
    assert [m["version"] for m in trained] == [2, 4, 6, 8] and all(m["updates"] == 2 for m in trained)
    assert [m["staleness_mean"] for m in trained] == [0, 1, 1, 1]  # step 0: version 0 is all there is
    for m in trained:
        for key in m.keys() - TIMING:
            assert m[key] == straight[m["step"]][key], (m["step"], key)
