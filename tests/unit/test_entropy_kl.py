"""The token entropy the learner logs (overall and split by advantage sign, with lengths), and the KL
penalty to a frozen reference: the estimators' definitions, zero at the reference, k3 never negative, and
the learner's reference (only built when kl_coef > 0, frozen at the initial weights). A short real run's
logs: tests/integration/test_entropy_kl_run.py."""

from __future__ import annotations

import math

import pytest
import torch

from asympo.batch import make_batch
from asympo.config import ObjectiveConfig, OptimConfig
from asympo.learner import Learner
from asympo.objectives import compute_loss
from asympo.objectives.common import LossInputs, ObjectiveError
from asympo.objectives.kl import kl_estimate
from tests.unit.test_learner import params, rollout


def test_estimators_follow_their_definitions():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    log_r = ref - logp  # [-0.5, 1.0]
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    expected = [math.exp(x) - 1 - x for x in log_r.tolist()]
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx(expected)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_zero_at_the_reference_and_k3_is_never_negative(estimator):
    logp = -torch.rand(1000) * 5
    assert kl_estimate(logp, logp.clone(), estimator).abs().max() == 0
    other = -torch.rand(1000) * 5
    if estimator != "k1":
        assert (kl_estimate(logp, other, estimator) >= 0).all()


def _inputs(lp, ref):
    lp = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    return LossInputs(
        logprobs=lp,
        mask=torch.tensor([[True, True], [True, False]]),
        advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
        group_ids=torch.tensor([0, 0]),
        reference_logprobs=None if ref is None else torch.tensor(ref, dtype=torch.float64),
    )


def test_the_penalty_adds_coef_times_the_token_mean_and_needs_a_reference():
    lp, ref = [[-1.0, -0.5], [-2.0, float("nan")]], [[-1.2, -0.5], [-1.0, 0.0]]
    base, _ = compute_loss(_inputs(lp, ref), ObjectiveConfig(name="pg"))
    k1 = ObjectiveConfig(name="pg", kl_coef=0.1, kl_estimator="k1")
    with_kl, metrics = compute_loss(_inputs(lp, ref), k1)
    mean_k1 = ((-1.0 + 1.2) + 0.0 + (-2.0 + 1.0)) / 3  # padding (nan) is masked out
    assert metrics["kl_ref"] == pytest.approx(mean_k1)
    assert float((with_kl - base).detach()) == pytest.approx(0.1 * mean_k1)
    at_reference = _inputs(lp, [[-1.0, -0.5], [-2.0, 0.0]])
    loss, _ = compute_loss(at_reference, ObjectiveConfig(name="pg", kl_coef=1.0, kl_estimator="k3"))
    plain = _inputs(lp, None)
    loss_plain, _ = compute_loss(plain, ObjectiveConfig(name="pg"))
    (grad_kl,) = torch.autograd.grad(loss, at_reference.logprobs)
    (grad_plain,) = torch.autograd.grad(loss_plain, plain.logprobs)
    assert torch.allclose(grad_kl, grad_plain)  # k3's gradient (1 - r) vanishes at the reference
    with pytest.raises(ObjectiveError, match="reference"):
        compute_loss(_inputs(lp, None), ObjectiveConfig(name="pg", kl_coef=0.1))


def test_the_learner_builds_a_frozen_reference_only_when_the_coefficient_is_positive(small_model, tokenizer):
    plain = Learner(small_model, ObjectiveConfig(name="pg"), OptimConfig())
    assert plain.reference is None
    samples = rollout(small_model, tokenizer)
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    assert "kl_ref" not in plain.step(batch)

    objective = ObjectiveConfig(name="pg", kl_coef=0.5)
    learner = Learner(small_model, objective, OptimConfig(lr=3e-3, warmup_steps=0))
    frozen = params(learner.reference)
    first = learner.step(batch)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy before any step
    for _ in range(3):
        last = learner.step(batch)
    assert last["kl_ref"] > 1e-4
    assert all(torch.equal(a, b) for a, b in zip(frozen, params(learner.reference), strict=True))
    assert not any(p.requires_grad for p in learner.reference.parameters())


def test_the_step_splits_entropy_and_length_by_advantage_sign(small_model, tokenizer):
    from asympo.logprobs import token_logprobs_entropy

    samples = rollout(small_model, tokenizer)
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    with torch.no_grad():
        _, entropy = token_logprobs_entropy(
            small_model, batch.input_ids, batch.attention_mask, 1.0, batch.response_mask
        )
    length = batch.response_mask.sum(-1)
    per_response = entropy.sum(-1) / length.clamp(min=1)
    pos, neg = batch.advantages > 0, batch.advantages < 0
    metrics = Learner(small_model, ObjectiveConfig(name="pg"), OptimConfig()).step(batch)
    assert metrics["entropy"] == pytest.approx(float(entropy.sum() / length.sum()), rel=1e-5)
    assert metrics["entropy_pos"] == pytest.approx(float(per_response[pos].mean()), rel=1e-5)
    assert metrics["entropy_neg"] == pytest.approx(float(per_response[neg].mean()), rel=1e-5)
    assert metrics["length_pos"] == pytest.approx(float(length[pos].float().mean()))
    assert metrics["length_neg"] == pytest.approx(float(length[neg].float().mean()))
