"""Chunked token log-probs equal the plain full-logits computation, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import asympo.logprobs
from asympo.logprobs import splits_head, token_logprobs


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
