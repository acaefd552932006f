"""Several optimiser updates per rollout batch (optim.minibatches, optim.epochs): groups stay whole, a
version is one update, PPO's clip acts within a batch, decoupled_ppo's proximal policy is each mini-batch's
starting weights. A lag-mode run that resumes exactly at a batch boundary:
tests/integration/test_minibatches_resume.py."""

from __future__ import annotations

import copy

import pytest
import torch

from asympo.batch import make_batch, minibatches
from asympo.config import ObjectiveConfig, OptimConfig
from asympo.learner import Learner
from tests.unit.test_learner import rollout


@pytest.fixture()
def batch(small_model, tokenizer):
    """An on-policy batch: 3 groups of 4, with the engine's behaviour log-probs at the model's weights."""
    return make_batch(rollout(small_model, tokenizer), tokenizer.pad_token_id, "group_norm")


def test_minibatches_are_whole_groups_as_even_as_can_be(batch):
    assert minibatches(batch, 1) == [batch]
    parts = minibatches(batch, 2)
    assert [p.group_ids.unique().tolist() for p in parts] == [[0], [1, 2]]
    assert sorted(torch.cat([p.input_ids for p in parts]).tolist()) == sorted(batch.input_ids.tolist())
    assert [len(p) for p in minibatches(batch, 3)] == [4, 4, 4]
    assert [len(p) for p in minibatches(batch, 5)] == [4, 4, 4]  # a batch that ended short: one per group


def learner(model, name: str, **optim) -> Learner:
    config = OptimConfig(lr=1e-2, warmup_steps=0, **optim)
    return Learner(copy.deepcopy(model), ObjectiveConfig(name=name), config)


def test_grpo_clips_an_on_policy_batch_only_when_it_takes_several_updates(small_model, batch):
    """One update of an on-policy batch sees ratios of 1 (the engine's and the learner's log-probs agree to
    about 1e-5); with 3 mini-batches the 2nd and 3rd are scored by weights that already moved."""
    one = learner(small_model, "grpo")
    published: list[int] = []
    stats = one.updates(batch, published.append)
    assert one.version == 1 and published == [] and stats["clip_frac"] == 0 and "updates" not in stats

    three = learner(small_model, "grpo", minibatches=3)
    stats = three.updates(batch, published.append)
    assert three.version == 3 and published == [1, 2] and stats["updates"] == 3
    assert stats["clip_frac"] > 0

    twice = learner(small_model, "grpo", epochs=2)
    stats = twice.updates(batch)
    assert twice.version == 2 and stats["updates"] == 2 and stats["clip_frac"] > 0  # the second pass clips


def test_decoupled_ppo_takes_its_proximal_policy_at_each_mini_batch_start(small_model, batch):
    """Against the proximal policy (this update's starting weights) every ratio is 1 when the loss is
    taken, so nothing clips; against the behaviour policy the later mini-batches are off-policy."""
    ppo = learner(small_model, "decoupled_ppo", minibatches=3)
    per_update = []
    original_step = ppo.step
    ppo.step = lambda part: per_update.append(original_step(part)) or per_update[-1]
    ppo.updates(batch)
    assert [m["clip_frac"] for m in per_update] == [0, 0, 0]
    assert [m["ratio_mean"] for m in per_update] == [1, 1, 1]
    # pi_prox / pi_behav: the first mini-batch's at the starting weights; the last one's at weights two
    # updates on, unlike the same mini-batch scored by a fresh learner
    parts = minibatches(batch, 3)
    fresh = [
        learner(small_model, "decoupled_ppo").step(p)["behaviour_weight_mean"] for p in (parts[0], parts[2])
    ]
    assert per_update[0]["behaviour_weight_mean"] == pytest.approx(fresh[0], abs=1e-6)
    assert abs(per_update[2]["behaviour_weight_mean"] - fresh[1]) > 1e-3
