"""Token log-probs of a causal LM without materialising full-vocabulary logits for the whole batch.

The naive way (model(...).logits, float32, log_softmax) holds B x L x V floats several times over (logits,
their float copy, log_softmax, and the same again in backward): for SmolLM2 (V = 49k) at 4 x 256 tokens,
about 200 MB each. Here the decoder's hidden states go through the output head a chunk of positions at a
time, and only the positions asked for (the response tokens) are scored. Small batches keep their softmax for
the backward (at most KEEP_ELEMENTS floats); bigger ones recompute each chunk's logits in the backward, so at
most one chunk's logits exist at any moment (see HeadLogprobs).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in float32)
# Up to this many probabilities in all (256 MB) the softmax is kept for the backward instead of recomputed:
# it saves a matmul over the vocabulary; bigger batches recompute and hold one chunk at a time.
KEEP_ELEMENTS = 1 << 26


class HeadLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[target] for a chunk of positions, with a hand-written
    backward that turns the chunk's softmax into the gradient in place (minus one at the target, times the
    incoming gradient), where autograd through logsumexp and gather would allocate several logits-sized
    temporaries. With `keep` the forward's softmax is kept for the backward; without, only the per-position
    logsumexp is, and the backward recomputes the chunk's logits (one more matmul, no memory held)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, keep: bool, compute: torch.dtype):
        logits = _logits(hidden, weight, temperature, compute)
        picked = logits.gather(-1, targets[:, None])[:, 0]
        peak = logits.amax(-1)
        total = logits.sub_(peak[:, None]).exp_().sum(-1)  # logits now hold exp(z - peak)
        lse = total.log().add_(peak)
        probs = logits.div_(total[:, None]) if keep else None
        ctx.save_for_backward(hidden, weight, targets, lse, probs)
        ctx.temperature, ctx.compute = temperature, compute
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, lse, probs = ctx.saved_tensors
        compute = ctx.compute
        if probs is None:
            probs = _logits(hidden, weight, ctx.temperature, compute).sub_(lse[:, None]).exp_()
        d_logits = probs.mul_(-grad[:, None])  # the kept softmax is used up: a graph is backpropagated once
        d_logits[torch.arange(len(targets), device=targets.device), targets] += grad
        if ctx.temperature not in (0.0, 1.0):
            d_logits.div_(ctx.temperature)
        # Autocast is off in a custom backward: the matmuls run in the forward's compute dtype explicitly,
        # and each gradient comes back in its input's dtype (float32 master weights under bf16 autocast).
        d_logits = d_logits.to(compute)
        d_hidden = (d_logits @ weight.to(compute)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        d_weight = (d_logits.T @ hidden.to(compute)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight, None, None, None, None


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, temperature: float, compute: torch.dtype
) -> torch.Tensor:
    """The head's logits in float32, from a matmul in `compute` (bf16 under autocast, else the weights')."""
    logits = (hidden.to(compute) @ weight.to(compute).T).float()
    return logits.div_(temperature) if temperature not in (0.0, 1.0) else logits


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head's matmul in: its dtype when active here, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


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
    keep = torch.is_grad_enabled() and picked.shape[0] * weight.shape[0] <= KEEP_ELEMENTS
    compute = compute_dtype(weight)
    parts = []
    for start in range(0, picked.shape[0], step):
        chunk, chunk_targets = picked[start : start + step], picked_targets[start : start + step]
        parts.append(HeadLogprobs.apply(chunk, weight, chunk_targets, temperature, keep, compute))
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    return out.masked_scatter(positions, torch.cat(parts)) if parts else out
