"""Token log-probs of a causal LM without materialising full-vocabulary logits for the whole batch.

The naive way (model(...).logits, float32, log_softmax) holds B x L x V floats several times over (logits,
their float copy, log_softmax, and the same again in backward): for SmolLM2 (V = 49k) at 4 x 256 tokens,
about 200 MB each. Here the decoder's hidden states go through the output head a chunk of positions at a
time, under activation checkpointing, so at most one chunk's logits exist at any moment, in forward and
in backward; and only the positions asked for (the response tokens) are scored at all.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in float32)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = (hidden @ weight.T).float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)


def splits_head(model: PreTrainedModel) -> bool:
    """Whether logits are exactly output_head(decoder(x)): true for Llama/Qwen/Mistral-style models, not
    for ones that scale or soft-cap their logits, which keep the plain path."""
    config = model.config
    head = model.get_output_embeddings()
    return (
        getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1.0)
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and hasattr(model, "get_decoder")
    )


def token_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(token t+1 | tokens <= t): [B, L-1]. With `positions` (bool [B, L-1]) only those are scored;
    the others are 0."""
    targets = input_ids[:, 1:]
    if not splits_head(model):
        logits = (
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        )
        if temperature not in (0.0, 1.0):
            logits = logits / temperature
        return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1]
    if positions is None:
        positions = torch.ones_like(targets, dtype=torch.bool)
    picked, picked_targets = hidden[positions], targets[positions]
    weight = model.get_output_embeddings().weight
    step = max(1, CHUNK_ELEMENTS // weight.shape[0])
    parts = []
    for start in range(0, picked.shape[0], step):
        args = (picked[start : start + step], weight, picked_targets[start : start + step], temperature)
        if torch.is_grad_enabled() and picked.requires_grad:
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    return out.masked_scatter(positions, torch.cat(parts)) if parts else out
