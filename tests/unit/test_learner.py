from __future__ import annotations

import copy

import torch

from asympo.batch import make_batch, micro_batches
from asympo.config import ObjectiveConfig, OptimConfig, SamplingConfig
from asympo.learner import Learner
from asympo.logprobs import token_logprobs
from asympo.rollout.hf import HFEngine


def rollout(model, tokenizer, n_prompts=3, group=4, seed=0):
    engine = HFEngine(copy.deepcopy(model), tokenizer)
    prompts = ["12+34=", "5-4+3=", "77="][:n_prompts]
    groups = engine.generate(
        prompts, group, SamplingConfig(max_new_tokens=5), torch.Generator().manual_seed(seed)
    )
    samples = [s for g in groups for s in g]
    for i, s in enumerate(samples):
        s.reward = float(i % 3 == 0)  # mixed rewards inside every group
    return samples


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_engine_behaviour_logprobs_match_learner_logprobs_at_the_same_weights(small_model, tokenizer):
    samples = rollout(small_model, tokenizer)
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    with torch.no_grad():
        current = token_logprobs(small_model, batch.input_ids, batch.attention_mask)
        # the engine samples with special tokens banned, so its behaviour policy is renormalised without them
        logits = small_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logits[..., HFEngine(small_model, tokenizer).banned] = float("-inf")
        sampled = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.response_mask
    torch.testing.assert_close(sampled[mask], batch.behaviour_logprobs[mask], atol=1e-4, rtol=0)
    assert (current[mask] - sampled[mask]).abs().max() < 0.1
    assert int(mask.sum()) == sum(len(s.response_ids) for s in samples)


def test_micro_batches_keep_groups_whole_and_accumulate_to_the_full_batch_step(small_model, tokenizer):
    samples = rollout(small_model, tokenizer)
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    parts = micro_batches(batch, 5)
    assert [len(p) for p in parts] == [4, 4, 4]
    assert all(p.group_ids.unique().numel() == 1 for p in parts)
    results = []
    for size in (100, 5):
        model = copy.deepcopy(small_model)
        learner = Learner(model, ObjectiveConfig(name="asympo"), OptimConfig(lr=1e-3, micro_batch_size=size))
        stats = learner.step(batch)
        results.append((params(model), stats))
    (full, s_full), (split, s_split) = results
    for a, b in zip(full, split, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert abs(s_full["loss"] - s_split["loss"]) < 1e-6
    assert abs(s_full["grad_norm"] - s_split["grad_norm"]) < 1e-5


def test_a_step_changes_weights_and_bumps_the_version(small_model, tokenizer):
    batch = make_batch(rollout(small_model, tokenizer), tokenizer.pad_token_id, "group_norm")
    before = params(small_model)
    learner = Learner(small_model, ObjectiveConfig(name="spo"), OptimConfig(lr=1e-3))
    stats = learner.step(batch)
    assert learner.version == 1 and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params(small_model), strict=True))
    weights = learner.weights()
    assert all(not w.requires_grad for w in weights.values())


def test_repeated_asympo_steps_raise_positive_and_lower_negative_likelihood(small_model, tokenizer):
    samples = rollout(small_model, tokenizer)
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    learner = Learner(small_model, ObjectiveConfig(name="asympo"), OptimConfig(lr=3e-3))

    def mean_nll(rows):
        with torch.no_grad():
            lp = token_logprobs(small_model, batch.input_ids, batch.attention_mask)
        m = batch.response_mask
        lbar = -(torch.where(m, lp, 0).sum(-1) / m.sum(-1))
        return lbar[rows].mean().item()

    pos, neg = batch.advantages > 0, batch.advantages < 0
    start = mean_nll(pos), mean_nll(neg)
    for _ in range(10):
        learner.step(batch)
    assert mean_nll(pos) < start[0] - 0.1
    assert mean_nll(neg) > start[1]


def test_non_finite_step_is_skipped_and_weights_stay(small_model, tokenizer):
    batch = make_batch(rollout(small_model, tokenizer), tokenizer.pad_token_id, "group_norm")
    batch.advantages[0] = float("nan")
    before = params(small_model)
    learner = Learner(small_model, ObjectiveConfig(name="pg"), OptimConfig(lr=1e-3))
    stats = learner.step(batch)
    assert learner.version == 0 and learner.skipped_steps == 1 and stats["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params(small_model), strict=True))


def test_published_weights_leave_out_the_tied_alias_and_load_into_an_engine(small_model, tokenizer):
    engine_model = copy.deepcopy(small_model)  # the weights before the step, tied the same way
    learner = Learner(small_model, ObjectiveConfig(name="asympo"), OptimConfig(lr=1e-2))
    learner.step(make_batch(rollout(small_model, tokenizer), tokenizer.pad_token_id, "group_norm"))
    weights = learner.weights()
    assert "lm_head.weight" in small_model.state_dict() and "lm_head.weight" not in weights
    assert len(weights) == len(small_model.state_dict()) - 1  # only the alias is left out
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(engine_model(ids).logits, small_model(ids).logits)
        HFEngine(engine_model, tokenizer).load_weights(weights, learner.version)
        torch.testing.assert_close(engine_model(ids).logits, small_model(ids).logits)
