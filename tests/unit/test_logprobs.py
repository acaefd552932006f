"""Chunked token log-probs equal the plain full-logits computation, in value and in gradient."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import asympo.logprobs
from asympo.logprobs import splits_head, token_logprobs, token_logprobs_entropy


def plain(model, input_ids, attention_mask, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]


@pytest.fixture()
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("keep", [True, False])  # the softmax kept for the backward, or recomputed there
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_plain_in_value_and_gradient(llama, monkeypatch, temperature, keep):
    monkeypatch.setattr(asympo.logprobs, "CHUNK_ELEMENTS", 1000 * 7)  # 7 positions per chunk: many chunks
    monkeypatch.setattr(asympo.logprobs, "KEEP_ELEMENTS", 10**9 if keep else 0)
    assert splits_head(llama)
    input_ids = torch.randint(0, 1000, (3, 20))
    attention = torch.ones_like(input_ids)
    attention[2, 15:] = 0  # right padding
    positions = torch.zeros(3, 19, dtype=torch.bool)
    positions[:, 5:] = True
    positions[2, 14:] = False
    weights = torch.randn(3, 19)

    expected = plain(llama, input_ids, attention, temperature)
    (expected * weights * positions).sum().backward()
    expected_grads = [p.grad.clone() for p in llama.parameters()]
    llama.zero_grad()

    got = token_logprobs(llama, input_ids, attention, temperature, positions)
    (got * weights).sum().backward()
    assert torch.allclose(got[positions], expected[positions], atol=1e-5)
    assert (got[~positions] == 0).all()
    for p, g in zip(llama.parameters(), expected_grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-5)
    full = token_logprobs(llama, input_ids, attention, temperature)
    assert torch.allclose(full, expected, atol=1e-5)


def test_models_that_scale_their_logits_keep_the_plain_path(llama, small_model):
    llama.config.final_logit_softcapping = 30.0
    assert not splits_head(llama)
    input_ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        assert torch.allclose(
            token_logprobs(llama, input_ids, torch.ones_like(input_ids)),
            plain(llama, input_ids, torch.ones_like(input_ids)),
        )
    assert splits_head(small_model)  # the tiny built-in (Qwen2) takes the chunked path


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_from_the_chunks_matches_the_full_softmax_and_leaves_logprobs_alone(
    llama, monkeypatch, temperature, keep
):
    monkeypatch.setattr(asympo.logprobs, "CHUNK_ELEMENTS", 1000 * 7)
    monkeypatch.setattr(asympo.logprobs, "KEEP_ELEMENTS", 10**9 if keep else 0)
    input_ids = torch.randint(0, 1000, (2, 16))
    attention = torch.ones_like(input_ids)
    positions = torch.zeros(2, 15, dtype=torch.bool)
    positions[:, 4:] = True
    with torch.no_grad():
        logits = llama(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        expected = -(logp.exp() * logp).sum(-1)
    got_lp, got_entropy = token_logprobs_entropy(llama, input_ids, attention, temperature, positions)
    assert not got_entropy.requires_grad
    assert torch.allclose(got_entropy[positions], expected[positions], atol=1e-5)
    assert (got_entropy[~positions] == 0).all()
    alone = token_logprobs(llama, input_ids, attention, temperature, positions)
    assert torch.equal(got_lp, alone)
    got_lp.sum().backward()  # the entropy output does not get in the way of the backward
    assert llama.lm_head.weight.grad is not None or llama.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("split", [True, False])  # the chunked head, and the full-logits path of other models
def test_entropy_of_a_uniform_policy_is_log_vocabulary(llama, monkeypatch, split):
    """A zero output head gives equal logits: every next-token distribution is uniform over V = 1000."""
    if not split:
        monkeypatch.setattr(asympo.logprobs, "splits_head", lambda model: False)
    llama.config.tie_word_embeddings = False
    llama.lm_head.weight = torch.nn.Parameter(torch.zeros(1000, 32))
    input_ids = torch.randint(0, 1000, (2, 10))
    _, entropy = token_logprobs_entropy(llama, input_ids, torch.ones_like(input_ids))
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(1000)), atol=1e-5)
