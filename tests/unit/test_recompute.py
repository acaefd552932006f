"""Learner-side behaviour log-probs: snapshots of recent versions, recompute, drop what cannot be scored.
Real runs with them: tests/integration/test_recompute_runs.py."""

from __future__ import annotations

import copy

import pytest
import torch

from asympo.batch import make_batch
from asympo.config import SamplingConfig
from asympo.logprobs import token_logprobs
from asympo.recompute import BehaviourRecompute
from asympo.rollout.hf import HFEngine
from asympo.snapshots import SnapshotStore


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_store_keeps_exactly_the_versions_a_lag_k_runtime_can_still_use(tmp_path, small_model, where):
    k = 2
    store = SnapshotStore(k + 1, where, tmp_path / "snap")
    for version in range(8):
        store.put(version, weights_of(small_model))
        assert store.versions == list(range(max(0, version - k), version + 1))
        assert store.get(max(0, version - k)) is not None  # the oldest admissible version is never gone
        if where == "disk":
            assert len(list((tmp_path / "snap").glob("*.safetensors"))) == len(store.versions)
    assert store.get(4) is None and store.evicted == 5


def test_republishing_a_version_replaces_it(small_model):
    store = SnapshotStore(2)
    store.put(3, {"w": torch.zeros(2)})
    store.put(3, {"w": torch.ones(2)})
    assert store.versions == [3] and torch.equal(store.get(3)["w"], torch.ones(2))


def sample_groups(model, tokenizer, version):
    engine = HFEngine(model, tokenizer, version=version, return_logprobs=False)
    groups = engine.generate(
        ["12+34=", "5+6="], 3, SamplingConfig(max_new_tokens=5), torch.Generator().manual_seed(0)
    )
    samples = [s for g in groups for s in g]
    assert all(s.behaviour_logprobs is None for s in samples)  # the engine sent ids, text and version only
    return samples


def test_recompute_scores_each_sample_under_its_own_version_and_drops_evicted_ones(small_model, tokenizer):
    old, new = copy.deepcopy(small_model), copy.deepcopy(small_model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    store = SnapshotStore(2)
    for version, model in ((0, old), (1, old), (2, new)):
        store.put(version, weights_of(model))  # version 0 is evicted by now
    stale, fresh, lost = (
        sample_groups(old, tokenizer, 1),
        sample_groups(new, tokenizer, 2),
        sample_groups(old, tokenizer, 0),
    )
    recompute = BehaviourRecompute(copy.deepcopy(small_model), store, tokenizer.pad_token_id)
    kept, stats = recompute.apply(stale + lost + fresh)
    assert kept == stale + fresh and stats["behaviour_dropped"] == len(lost)
    for samples, model in ((stale, old), (fresh, new)):
        batch = make_batch(samples, tokenizer.pad_token_id, "mean")
        expected = token_logprobs(model.eval(), batch.input_ids, batch.attention_mask)
        for row, s in enumerate(samples):
            torch.testing.assert_close(
                torch.tensor(s.behaviour_logprobs), expected[row][batch.response_mask[row]]
            )


def test_a_response_that_spans_versions_takes_each_token_from_its_own_versions_snapshot(
    small_model, tokenizer
):
    """In-flight updates: the first tokens came from version 1, the rest from version 2. Each token's
    behaviour log-prob must be its own version's, which neither snapshot alone gives; a sample that needs an
    evicted version is dropped whole, even if its other versions are still there."""
    v1, v2 = copy.deepcopy(small_model), copy.deepcopy(small_model)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    store = SnapshotStore(2)
    for version, model in ((0, v1), (1, v1), (2, v2)):
        store.put(version, weights_of(model))  # version 0 is evicted
    samples = sample_groups(v1, tokenizer, 1)
    spanning, whole, lost = samples[0], samples[1], samples[2]
    n = len(spanning.response_ids)
    assert n >= 2
    spanning.token_versions = [1] * (n // 2) + [2] * (n - n // 2)
    lost.token_versions = [0] + [1] * (len(lost.response_ids) - 1)
    recompute = BehaviourRecompute(copy.deepcopy(small_model), store, tokenizer.pad_token_id)
    kept, stats = recompute.apply(samples)
    assert lost not in kept and len(kept) == len(samples) - 1 and stats["behaviour_dropped"] == 1
    batch = make_batch([spanning, whole], tokenizer.pad_token_id, "mean")
    under = {
        v: token_logprobs(m.eval(), batch.input_ids, batch.attention_mask) for v, m in ((1, v1), (2, v2))
    }
    got = torch.tensor(spanning.behaviour_logprobs)
    first, second = (under[v][0][batch.response_mask[0]] for v in (1, 2))
    torch.testing.assert_close(got[: n // 2], first[: n // 2])
    torch.testing.assert_close(got[n // 2 :], second[n // 2 :])
    assert (second[: n // 2] - first[: n // 2]).abs().max() > 1e-3  # the versions differ on these tokens
    torch.testing.assert_close(torch.tensor(whole.behaviour_logprobs), under[1][1][batch.response_mask[1]])
