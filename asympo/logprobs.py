"""Token log-probs of a causal LM without materialising full-vocabulary logits for the whole batch.

The naive way (model(...).logits, float32, log_softmax) holds B x L x V floats several times over (logits,
their float copy, log_softmax, and the same again in backward): for SmolLM2 (V = 49k) at 4 x 256 tokens,
about 200 MB each. Here the decoder's hidden states go through the output head a chunk of positions at a
time, and only the positions asked for (the response tokens) are scored. Small batches keep their softmax for
the backward (at most KEEP_ELEMENTS floats); bigger ones recompute each chunk's logits in the backward, so at
most one chunk's logits exist at any moment (see HeadLogprobs). The policy's token entropy comes out of the
same chunks (`token_logprobs_entropy`), so the learner logs it every step without a second pass.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in float32)
# Up to this many probabilities in all (256 MB) the softmax is kept for the backward instead of recomputed:
# it saves a matmul over the vocabulary; bigger batches recompute and hold one chunk at a time.
KEEP_ELEMENTS = 1 << 26


class HeadLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[target] for the scored positions, `step` positions (a
    chunk) at a time, with a hand-written backward that turns each chunk's softmax into the gradient in place
    (minus one at the target, times the incoming gradient), where autograd through logsumexp and gather would
    allocate several logits-sized temporaries. With `keep` the forward's softmax is kept for the backward;
    without, only the per-position logsumexp is, and the backward recomputes each chunk's logits (one more
    matmul, one chunk held at a time).

    The matmuls run in `compute` (bf16 under autocast; autocast itself is off in a custom backward) and the
    softmax in float32. The weight is cast once per call, not per chunk: on a CPU each cast of SmolLM2's
    49k x 576 head cost ~90 ms inside a step, nine of them a third of a bf16 step. With `keep` the weight's
    gradient is one matmul over every chunk (rounded once, like any other layer's); without, each chunk's
    part is added into a float32 sum.

    With `entropy` it also returns each position's entropy H = log Z - sum(e s) / Z, where s = z - max z and
    e = exp(s), Z = sum e: one more chunk-sized buffer (e beside s) and a dot product per position. The
    entropy is a diagnostic: it carries no gradient."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        temperature: float,
        keep: bool,
        compute: torch.dtype,
        step: int,
        entropy: bool = False,
    ):
        h, w = hidden.to(compute), weight.to(compute)
        out, lse, kept, entropies = [], [], [], []
        for start in range(0, h.shape[0], step):
            logits = _scaled((h[start : start + step] @ w.T).float(), temperature)
            picked = logits.gather(-1, targets[start : start + step, None])[:, 0]
            peak = logits.amax(-1)
            shifted = logits.sub_(peak[:, None])
            exp = shifted.exp() if entropy else shifted.exp_()  # in place unless s is still needed
            total = exp.sum(-1)
            lse.append(total.log().add_(peak))
            out.append(picked - lse[-1])
            if entropy:
                dot = torch.bmm(exp[:, None, :], shifted[:, :, None]).view(-1)
                entropies.append(total.log() - dot / total)
            if keep:
                kept.append(exp.div_(total[:, None]))
        ctx.save_for_backward(h, w, targets, torch.cat(lse), *kept)
        ctx.temperature, ctx.step = temperature, step
        ctx.dtypes = (hidden.dtype, weight.dtype)
        scored = torch.cat(out)
        ent = torch.cat(entropies) if entropy else scored.new_zeros(0)
        ctx.mark_non_differentiable(ent)
        return scored, ent

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_entropy: torch.Tensor | None = None):
        h, w, targets, lse, *kept = ctx.saved_tensors
        step, temperature = ctx.step, ctx.temperature
        hidden_dtype, weight_dtype = ctx.dtypes
        need_h, need_w = ctx.needs_input_grad[:2]
        # bf16 with the softmax kept: each chunk's gradient is cast into one buffer and the two matmuls run
        # once over all of it; otherwise (float32, or recomputed chunks) chunk by chunk
        whole = h.new_empty(h.shape[0], w.shape[0]) if kept and h.dtype != weight_dtype else None
        d_h, d_w = [], None
        for i, start in enumerate(range(0, h.shape[0], step)):
            rows = slice(start, start + step)
            if kept:
                probs = kept[i]
            else:
                probs = _scaled((h[rows] @ w.T).float(), temperature).sub_(lse[rows, None]).exp_()
            g = grad[rows]
            d_logits = probs.mul_(-g[:, None])  # the kept softmax is used up: a graph is backpropagated once
            d_logits[torch.arange(len(g), device=g.device), targets[rows]] += g
            if temperature not in (0.0, 1.0):
                d_logits.div_(temperature)
            if whole is not None:
                whole[rows] = d_logits
                continue
            d_logits = d_logits.to(h.dtype)
            if need_h:
                d_h.append(d_logits @ w)
            if need_w:
                part = d_logits.T @ h[rows]
                d_w = part.float() if d_w is None else d_w.add_(part)
        if whole is not None:
            d_h = [whole @ w] if need_h else []
            d_w = whole.T @ h if need_w else None
        d_hidden = torch.cat(d_h).to(hidden_dtype) if need_h else None
        d_weight = d_w.to(weight_dtype) if need_w else None
        return d_hidden, d_weight, None, None, None, None, None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
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
    return score_tokens(model, input_ids, attention_mask, temperature, positions, entropy=False)[0]


def token_logprobs_entropy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As token_logprobs, plus the entropy (nats, no gradient) of the tempered next-token distribution at
    each scored position: [B, L-1] each, 0 where not scored."""
    logprobs, entropy = score_tokens(model, input_ids, attention_mask, temperature, positions, entropy=True)
    assert entropy is not None
    return logprobs, entropy


def score_tokens(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    positions: torch.Tensor | None,
    entropy: bool,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and (with `entropy`) entropies of the scored positions; the one pass behind both.
    `position_ids` with a 4D `attention_mask`: several sequences in a row (`asympo.batch.Packed`)."""
    targets = input_ids[:, 1:]
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if not splits_head(model):
        logits = (
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
            .logits[:, :-1]
            .float()
        )
        if temperature not in (0.0, 1.0):
            logits = logits / temperature
        logp = torch.log_softmax(logits, -1)
        scored = logp.gather(-1, targets[..., None])[..., 0]
        ent = -(logp.detach().exp() * logp.detach()).sum(-1) if entropy else None
        if positions is not None:
            scored = scored.masked_fill(~positions, 0.0)
            ent = ent.masked_fill(~positions, 0.0) if ent is not None else None
        return scored, ent
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    hidden = out.last_hidden_state
    hidden = hidden[:, :-1]
    if positions is None:
        positions = torch.ones_like(targets, dtype=torch.bool)
    picked, picked_targets = hidden[positions], targets[positions]
    weight = model.get_output_embeddings().weight
    step = max(1, CHUNK_ELEMENTS // weight.shape[0])
    keep = torch.is_grad_enabled() and picked.shape[0] * weight.shape[0] <= KEEP_ELEMENTS
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    ent_out = out.clone() if entropy else None
    if not picked.shape[0]:
        return out, ent_out
    scored, ent = HeadLogprobs.apply(
        picked, weight, picked_targets, temperature, keep, compute_dtype(weight), step, entropy
    )
    if ent_out is not None:
        ent_out = ent_out.masked_scatter(positions, ent)
    return out.masked_scatter(positions, scored), ent_out
