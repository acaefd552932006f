"""Micro-batches cut to their own longest sequence, `optim.packing=sorted`, and `packed` (several sequences
per row): the same loss and gradient as one padded batch (normalisers are the whole batch's), less padding,
groups never split."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from asympo.batch import computed_tokens, make_batch, micro_batches, pack, pack_rows
from asympo.config import OBJECTIVE_NAMES, ObjectiveConfig, OptimConfig
from asympo.learner import Learner
from asympo.rollout.base import Sample


def long_tailed(vocab: int, groups: int = 6, size: int = 4, seed: int = 0) -> list[Sample]:
    """Groups whose responses mostly stop early and now and then run long, as RL responses do."""
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(3, 8))]
        for i in range(size):
            length = rng.choice([2, 3, 4, 5, 40]) if g % 3 == 0 else rng.randint(2, 6)
            response = [rng.randrange(4, vocab) for _ in range(length)]
            behaviour = [-rng.random() - 3.0 for _ in response]
            samples.append(
                Sample("", prompt, response, "", "stop", 0, behaviour, reward=float(i % 2), group=g)
            )
    return samples


def gradients(model, batch, objective: ObjectiveConfig, size: int, packing: str):
    learner = Learner(
        copy.deepcopy(model), objective, OptimConfig(micro_batch_size=size, packing=packing, grad_clip=1e9)
    )
    learner.optimizer.step = lambda: None  # keep the gradients, not the update
    stats = learner.step(batch)
    return [p.grad.clone() for p in learner.model.parameters()], stats


# m2po's token mask is computed over the tokens a micro-batch holds (documented there): another split is
# another mask, so it is left out here
NAMES = [n for n in OBJECTIVE_NAMES if n != "m2po"]


@pytest.mark.parametrize(
    "objective",
    [ObjectiveConfig(name=n) for n in NAMES]
    + [ObjectiveConfig(name="asympo", asympo_scale="group"), ObjectiveConfig(name="asympo", kl_coef=0.1)],
    ids=[*NAMES, "asympo-group", "asympo-kl"],
)
def test_cut_and_sorted_micro_batches_give_the_padded_batchs_loss_and_gradient(small_model, objective):
    batch = make_batch(long_tailed(small_model.config.vocab_size), 0, "group_norm")
    reference, ref_stats = gradients(small_model, batch, objective, 1000, "none")  # one padded micro-batch
    for packing in ("none", "sorted", "packed"):
        grads, stats = gradients(small_model, batch, objective, 4, packing)
        # float32 sums in another order (other micro-batches, other widths): differences of a few ulps
        for a, b in zip(reference, grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5, abs=1e-7)
        assert stats["entropy"] == pytest.approx(ref_stats["entropy"], rel=1e-5)


def test_sorted_micro_batches_hold_whole_groups_and_less_padding(small_model):
    batch = make_batch(long_tailed(small_model.config.vocab_size, groups=9), 0, "group_norm")
    lengths = batch.attention_mask.sum(-1)
    padded = 1 - float(lengths.sum()) / batch.attention_mask.numel()
    share = {}
    for packing in ("none", "sorted"):
        parts = micro_batches(batch, 4, packing)
        assert sorted(torch.cat([p.group_ids for p in parts]).tolist()) == sorted(batch.group_ids.tolist())
        assert all(p.group_ids.unique().numel() == 1 for p in parts)  # groups of 4 in micro-batches of 4
        assert all(p.input_ids.shape[1] == int(p.attention_mask.sum(-1).max()) for p in parts)
        share[packing] = 1 - float(lengths.sum()) / sum(p.attention_mask.numel() for p in parts)
    assert share["sorted"] <= share["none"] < padded
    learner = Learner(
        copy.deepcopy(small_model), ObjectiveConfig(), OptimConfig(micro_batch_size=4, packing="sorted")
    )
    assert learner.step(batch)["pad_share"] == pytest.approx(share["none"])


def test_packed_rows_hold_whole_sequences_and_score_each_as_if_alone(small_model):
    batch = make_batch(long_tailed(small_model.config.vocab_size, groups=9), 0, "group_norm")
    lengths = batch.attention_mask.sum(-1).tolist()
    bins = pack_rows(lengths)
    assert sorted(b for row in bins for b in row) == list(range(len(lengths)))
    width = max(sum(lengths[b] for b in row) for row in bins)
    assert width <= 2 * max(lengths) and len(bins) < len(lengths)  # the short ones share rows
    packed = pack(batch)
    assert packed.input_ids.shape == (len(bins), width)
    with torch.no_grad():
        padded = Learner(small_model, ObjectiveConfig(), OptimConfig(packing="none")).logprobs(batch)
        rows = Learner(small_model, ObjectiveConfig(), OptimConfig(packing="packed")).logprobs(batch)
    # the same tokens and positions; only the attention mask's shape differs: float32 rounding
    torch.testing.assert_close(rows, padded, atol=2e-5, rtol=1e-5)
    assert bool((rows[~batch.response_mask] == 0).all())
    assert computed_tokens(batch, "packed") == len(bins) * width < computed_tokens(batch, "none")


def test_packing_cuts_the_padding_the_learner_reports(small_model):
    batch = make_batch(long_tailed(small_model.config.vocab_size, groups=9), 0, "group_norm")
    shares = {
        packing: Learner(
            copy.deepcopy(small_model), ObjectiveConfig(), OptimConfig(micro_batch_size=12, packing=packing)
        ).step(batch)["pad_share"]
        for packing in ("sorted", "packed")
    }
    assert shares["packed"] < shares["sorted"]
