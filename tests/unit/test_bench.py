"""`asympo bench`: the learner's FLOP count and the synthetic batch are checked against hand counts. The
quick mode through the CLI: tests/integration/test_bench_cli.py."""

from __future__ import annotations

import torch

from asympo.batch import synthetic_batch
from asympo.bench.learner import matmul_peak, step_flops


def test_step_flops_counts_decoder_head_and_causal_attention(small_model):
    batch = synthetic_batch(vocab=small_model.config.vocab_size, rows=2, length=16)
    config = small_model.config
    d, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inner  # q, o; k, v; gate, up, down
    tokens, scored = 2 * 16, 2 * (16 - 1 - (16 // 4 - 1))
    attention = 2 * (2 * 16 * 17) * config.num_attention_heads * head_dim * layers
    expected = 3 * (2 * per_layer * layers * tokens + 2 * config.vocab_size * d * scored + attention)
    assert step_flops(small_model, batch) == expected


def test_synthetic_batch_has_groups_and_behaviour_logprobs_on_responses_only():
    batch = synthetic_batch(vocab=50, rows=8, length=32)
    assert batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (batch.behaviour_logprobs[~batch.response_mask] == 0).all()
    assert (batch.behaviour_logprobs[batch.response_mask] < 0).all()
    assert batch.response_mask[:, :7].sum() == 0 and batch.response_mask[:, 7:].all()


def test_matmul_peak_is_a_plausible_rate():
    torch.set_num_threads(1)
    rate, n = matmul_peak((64, 128), repeats=2)
    assert n in (64, 128) and 1e7 < rate < 1e13
