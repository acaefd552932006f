"""Current-policy-only objectives: L = (1/N) sum_i C_i A_i lbar_i, with no behaviour log-probs at all.

They differ only in the per-response weight C_i (and pg-variants in how A_i is formed), so each one is a
weight vector fed to `_weighted_nll`. All of them aggregate per response by default: every response
weighs the same, whatever its length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asympo.advantages import group_mean
from asympo.config import ObjectiveConfig
from asympo.objectives.common import LossInputs, advantages, aggregate, current_logprobs, mean_nll
from asympo.objectives.registry import register, register_diagnostics

AGGREGATION = "response"  # the default for this whole family


def _weighted_nll(inputs: LossInputs, cfg: ObjectiveConfig, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Token loss weight_i * l_it, aggregated; `weight` [B] carries no gradient."""
    token_loss = weight[:, None] * -current_logprobs(inputs)
    return aggregate(token_loss, inputs, cfg.aggregation or AGGREGATION)


@register("pg", advantage="group_norm", aggregation=AGGREGATION)
def pg(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """Naive current-policy loss (C = 1): stale negatives sit at high NLL and dominate the gradient."""
    return _weighted_nll(inputs, cfg, advantages(inputs))


def _damp_negatives(inputs: LossInputs, cfg: ObjectiveConfig, c: float) -> tuple[Tensor, Tensor]:
    adv = advantages(inputs)
    return _weighted_nll(inputs, cfg, torch.where(adv >= 0, adv, adv * c))


@register("spo", advantage="group_norm", aggregation=AGGREGATION)
def spo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """Fixed damping of negative-advantage responses by spo_c."""
    return _damp_negatives(inputs, cfg, cfg.spo_c)


SPO_POS_C = 0.1  # spo_pos: the weight of negative-advantage responses


@register("spo_pos", advantage="group_norm", aggregation=AGGREGATION)
def spo_pos(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """SPO leaning on the positives: negative-advantage responses at a tenth of their pg weight. The fair
    study's best current-policy objective: pushing down stale negatives is what drifts the policy."""
    return _damp_negatives(inputs, cfg, SPO_POS_C)


def asympo_weights(inputs: LossInputs, cfg: ObjectiveConfig) -> Tensor:
    """C_i = 1 / max(sg(lbar_i), eps), optionally times sg(mean lbar of the group) to keep pg's scale.

    The stop-gradient is the whole point: the forward value of C_i A_i lbar_i is A_i (zero-sum per group),
    while the gradient is A_i grad(lbar_i) / lbar_i. Without it the term is the constant A_i, gradient 0.
    """
    lbar = mean_nll(inputs).detach()
    weight = 1.0 / lbar.clamp(min=cfg.asympo_eps)
    if cfg.asympo_scale == "group":
        weight = weight * group_mean(lbar, inputs.group_ids)
    return weight


@register("asympo", advantage="group_norm", aggregation=AGGREGATION)
def asympo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """ASymPO: each response's gradient is damped by its own NLL, so stale high-NLL ones cannot dominate."""
    return _weighted_nll(inputs, cfg, asympo_weights(inputs, cfg) * advantages(inputs))


@register("asymre", advantage="mean", aggregation=AGGREGATION)
def asymre(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """Asymmetric REINFORCE: baseline V = mean + dv with dv < 0, i.e. A_i - dv; a group of equal rewards
    still gets a small positive push (by design)."""
    return _weighted_nll(inputs, cfg, advantages(inputs) - cfg.asymre_dv)


@register("gpg", advantage="mean", aggregation=AGGREGATION)
def gpg(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """Group Policy Gradient: plain policy gradient on alpha * (r - mean), no ratio."""
    return _weighted_nll(inputs, cfg, cfg.gpg_alpha * advantages(inputs))


@register_diagnostics("asympo")
def asympo_diagnostics(inputs: LossInputs, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    """The weights C_i, split by advantage sign, and the positive responses' share of sum |C_i A_i|: pg's
    share is 1/2 under group_norm advantages (zero-sum groups), so a share above 1/2 is ASymPO's tilt."""
    weight, adv = asympo_weights(inputs, cfg), inputs.advantages
    pos, neg = adv > 0, adv < 0
    effective = (weight * adv).abs()
    out = {
        "asympo_scale_mean": weight.mean(),
        "asympo_scale_max": weight.max(),
        "asympo_pos_share": effective[pos].sum() / effective.sum().clamp(min=1e-12),
    }
    if bool(pos.any()):
        out["asympo_scale_pos"] = weight[pos].mean()
    if bool(neg.any()):
        out["asympo_scale_neg"] = weight[neg].mean()
    return out
