"""Behaviour-corrected baselines: they reweight by pi_theta / pi_behav, so they need the engine's log-probs.

At the behaviour policy itself (ratio 1, no clipping) every one of them has the gradient of `pg` under
its aggregation, which is what the tests pin down; they differ in how they treat off-policy tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asympo.config import ObjectiveConfig
from asympo.objectives.common import (
    LossInputs,
    advantages,
    aggregate,
    current_logprobs,
    fixed_logprobs,
    lengths,
    token_mean,
)
from asympo.objectives.registry import register, register_diagnostics


def _clipped_surrogate(ratio: Tensor, adv: Tensor, low: float, high: float) -> Tensor:
    """PPO's pessimistic bound -min(r A, clip(r) A): no incentive to move r outside [low, high]."""
    return -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)


def _clipped(ratio: Tensor, adv: Tensor, low: float, high: float) -> Tensor:
    """Where the clip removes the gradient: the ratio left the range in the direction A rewards."""
    return ((ratio > high) & (adv > 0)) | ((ratio < low) & (adv < 0))


def _token_ratio(inputs: LossInputs) -> Tensor:
    """rho_it = pi_theta / pi_behav per token; exactly 1 on padding."""
    return torch.exp(current_logprobs(inputs) - fixed_logprobs(inputs, "behaviour"))


def _ppo(inputs: LossInputs, cfg: ObjectiveConfig, high: float, how: str) -> tuple[Tensor, Tensor]:
    token_loss = _clipped_surrogate(_token_ratio(inputs), advantages(inputs)[:, None], 1 - cfg.clip_eps, high)
    return aggregate(token_loss, inputs, cfg.aggregation or how)


@register("grpo", advantage="group_norm", aggregation="response", needs_behaviour=True)
def grpo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """GRPO without KL: token-ratio clipped surrogate, mean over a response's tokens, then over responses."""
    return _ppo(inputs, cfg, 1 + cfg.clip_eps, "response")


@register("dapo", advantage="group_norm", aggregation="token", needs_behaviour=True)
def dapo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """DAPO: clip-higher (1 - clip_eps, 1 + clip_eps_high) and a token-level mean over the batch."""
    return _ppo(inputs, cfg, 1 + cfg.clip_eps_high, "token")


@register("dr_grpo", advantage="mean", aggregation="constant", needs_behaviour=True)
def dr_grpo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """Dr.GRPO: no std in the advantage, and a constant length normaliser (no length bias)."""
    return _ppo(inputs, cfg, 1 + cfg.clip_eps, "constant")


def _sequence_ratio(inputs: LossInputs) -> Tensor:
    """s_i = (pi_theta(y_i) / pi_behav(y_i)) ** (1 / |y_i|), the length-normalised sequence ratio [B]."""
    log_ratio = current_logprobs(inputs) - fixed_logprobs(inputs, "behaviour")
    return torch.exp(log_ratio.sum(-1) / lengths(inputs.mask, log_ratio.dtype))


@register("gspo", advantage="group_norm", aggregation="response", needs_behaviour=True)
def gspo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """GSPO: one clipped ratio per response, so a single odd token cannot veto a whole sequence."""
    loss = _clipped_surrogate(_sequence_ratio(inputs), advantages(inputs), 1 - cfg.gspo_eps, 1 + cfg.gspo_eps)
    return aggregate(loss[:, None].expand_as(inputs.logprobs), inputs, cfg.aggregation or "response")


def _weighted_logprob(
    inputs: LossInputs, cfg: ObjectiveConfig, weight: Tensor, how: str
) -> tuple[Tensor, Tensor]:
    """REINFORCE with a stop-gradient importance weight: -sg(w) A log pi; no token ever loses its gradient."""
    token_loss = -weight.detach() * advantages(inputs)[:, None] * current_logprobs(inputs)
    return aggregate(token_loss, inputs, cfg.aggregation or how)


@register("cispo", advantage="group_norm", aggregation="token", needs_behaviour=True)
def cispo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """CISPO: clip the importance weight (at 1 + clip_eps_high), not the update; token-level mean."""
    return _weighted_logprob(inputs, cfg, _token_ratio(inputs).clamp(max=1 + cfg.clip_eps_high), "token")


@register("tis", advantage="group_norm", aggregation="response", needs_behaviour=True)
def tis(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """Truncated importance sampling: weight min(rho, tis_cap), per-response mean."""
    return _weighted_logprob(inputs, cfg, _token_ratio(inputs).clamp(max=cfg.tis_cap), "response")


def m2po_keep(log_ratio: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """M2PO's token mask [B, T]: drop the response tokens with the largest (log rho)^2, as few as possible,
    so that the mean (log rho)^2 over the tokens kept is at most `threshold`. Padding is never kept."""
    squared = log_ratio.detach().float().square()
    keep = mask.clone()
    values = squared[mask]
    if values.numel() == 0 or values.mean() <= threshold:
        return keep
    order = values.argsort(descending=True)
    # mean of what is left after dropping the j largest, for j = 0 .. n-1
    dropped = torch.cat([values.new_zeros(1), values[order].cumsum(0)[:-1]])
    left = torch.arange(values.numel(), 0, -1, device=values.device, dtype=values.dtype)
    fits = ((values.sum() - dropped) / left <= threshold).nonzero()
    drop = int(fits[0]) if fits.numel() else values.numel() - 1  # always keeps one token at least
    kept = torch.ones_like(values, dtype=torch.bool)
    kept[order[:drop]] = False
    keep[mask] = kept
    return keep


@register("m2po", advantage="group_norm", aggregation="token", needs_behaviour=True)
def m2po(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """M2PO (arXiv 2510.01161): -rho A on the tokens m2po_keep leaves, no clip; token-level mean.

    Instead of clipping each ratio, it bounds the second moment of the log ratios of the tokens it trains
    on, so only the extreme outliers lose their gradient. The mask is computed over the tokens the loss
    sees at once (the micro-batch: the whole batch unless optim.micro_batch_size is smaller)."""
    log_ratio = current_logprobs(inputs) - fixed_logprobs(inputs, "behaviour")
    keep = m2po_keep(log_ratio, inputs.mask, cfg.m2po_threshold)
    token_loss = -torch.exp(log_ratio) * advantages(inputs)[:, None]
    return aggregate(
        torch.where(keep, token_loss, torch.zeros_like(token_loss)), inputs, cfg.aggregation or "token"
    )


def _decoupled_parts(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """(r = pi_theta / pi_prox, w = sg(min(pi_prox / pi_behav, cap))), both [B, T]."""
    proximal = fixed_logprobs(inputs, "proximal")
    ratio = torch.exp(current_logprobs(inputs) - proximal)
    weight = torch.exp(proximal - fixed_logprobs(inputs, "behaviour")).clamp(max=cfg.behaviour_weight_cap)
    return ratio, weight


@register(
    "decoupled_ppo", advantage="group_norm", aggregation="response", needs_behaviour=True, needs_proximal=True
)
def decoupled_ppo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """AReaL's decoupled PPO: trust region around the proximal policy, off-policyness by importance weight."""
    ratio, weight = _decoupled_parts(inputs, cfg)
    surrogate = _clipped_surrogate(ratio, advantages(inputs)[:, None], 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    return aggregate(weight * surrogate, inputs, cfg.aggregation or "response")


def _ratio_stats(inputs: LossInputs, ratio: Tensor, clipped: Tensor) -> dict[str, Tensor]:
    """Token means over response tokens of the ratio and of the clip indicator."""
    clip_frac = token_mean(clipped.to(ratio.dtype), inputs.mask)
    return {"ratio_mean": token_mean(ratio, inputs.mask), "clip_frac": clip_frac}


def _ppo_diagnostics(inputs: LossInputs, ratio: Tensor, low: float, high: float) -> dict[str, Tensor]:
    return _ratio_stats(inputs, ratio, _clipped(ratio, advantages(inputs)[:, None], low, high))


@register_diagnostics("grpo")
def grpo_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    return _ppo_diagnostics(inputs, _token_ratio(inputs), 1 - cfg.clip_eps, 1 + cfg.clip_eps)


register_diagnostics("dr_grpo")(grpo_diagnostics)  # the same clipped token ratio


@register_diagnostics("dapo")
def dapo_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    return _ppo_diagnostics(inputs, _token_ratio(inputs), 1 - cfg.clip_eps, 1 + cfg.clip_eps_high)


@register_diagnostics("gspo")
def gspo_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    """Per-response: mean sequence ratio and share of responses whose gradient the clip removes."""
    ratio = _sequence_ratio(inputs)
    clipped = _clipped(ratio, advantages(inputs), 1 - cfg.gspo_eps, 1 + cfg.gspo_eps)
    return {"ratio_mean": ratio.mean(), "clip_frac": clipped.to(ratio.dtype).mean()}


def _truncation_diagnostics(inputs: LossInputs, cap: float) -> dict[str, Tensor]:
    ratio = _token_ratio(inputs)
    return _ratio_stats(inputs, ratio, ratio > cap)


@register_diagnostics("cispo")
def cispo_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    return _truncation_diagnostics(inputs, 1 + cfg.clip_eps_high)


@register_diagnostics("tis")
def tis_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    return _truncation_diagnostics(inputs, cfg.tis_cap)


@register_diagnostics("m2po")
def m2po_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    """clip_frac: the share of response tokens masked; m2 / m2_kept: mean (log rho)^2 before and after."""
    log_ratio = current_logprobs(inputs) - fixed_logprobs(inputs, "behaviour")
    keep = m2po_keep(log_ratio, inputs.mask, cfg.m2po_threshold)
    squared = log_ratio.square()
    stats = _ratio_stats(inputs, torch.exp(log_ratio), inputs.mask & ~keep)
    return stats | {"m2": token_mean(squared, inputs.mask), "m2_kept": token_mean(squared, keep)}


@register_diagnostics("decoupled_ppo")
def decoupled_ppo_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    """Ratio stats of pi_theta / pi_prox, plus the mean capped weight pi_prox / pi_behav."""
    ratio, weight = _decoupled_parts(inputs, cfg)
    out = _ppo_diagnostics(inputs, ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    return out | {"behaviour_weight_mean": token_mean(weight, inputs.mask)}
