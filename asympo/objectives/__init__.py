"""The objectives registry and `compute_loss`, the one entry point the learner calls.

Each objective is a pure function (LossInputs, ObjectiveConfig) -> (loss, per-response contributions [B]);
the contributions sum to the loss, which is what lets the diagnostics split it by advantage sign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from asympo.objectives import behaviour, current
from asympo.objectives.common import (
    LossInputs,
    ObjectiveConfig,
    ObjectiveError,
    fixed_logprobs,
    response_diagnostics,
    token_mean,
)
from asympo.objectives.kl import kl_penalty

LossFn = Callable[[LossInputs, ObjectiveConfig], tuple[Tensor, Tensor]]
DiagnosticsFn = Callable[[LossInputs, ObjectiveConfig], dict[str, Tensor]]


@dataclass(frozen=True)
class Objective:
    """A registry entry: the loss function plus what it needs and its defaults."""

    name: str
    fn: LossFn
    needs_behaviour: bool
    needs_proximal: bool
    default_advantage: str
    default_aggregation: str
    doc: str
    diagnostics: DiagnosticsFn | None = None  # objective-specific metrics (clip_frac, ratio_mean, ...)


def _entry(
    module: ModuleType, name: str, advantage: str, aggregation: str, proximal: bool = False
) -> Objective:
    """Look up `name` and its optional `name_diagnostics` in the module that implements it."""
    fn = getattr(module, name)
    needs_behaviour = module is behaviour
    diagnostics = getattr(module, f"{name}_diagnostics", None)
    doc = (fn.__doc__ or "").strip()
    return Objective(name, fn, needs_behaviour, proximal, advantage, aggregation, doc, diagnostics)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        _entry(current, "pg", "group_norm", current.AGGREGATION),
        _entry(current, "spo", "group_norm", current.AGGREGATION),
        _entry(current, "spo_pos", "group_norm", current.AGGREGATION),
        _entry(current, "asympo", "group_norm", current.AGGREGATION),
        _entry(current, "asymre", "mean", current.AGGREGATION),
        _entry(current, "gpg", "mean", current.AGGREGATION),
        _entry(behaviour, "grpo", "group_norm", "response"),
        _entry(behaviour, "dapo", "group_norm", "token"),
        _entry(behaviour, "dr_grpo", "mean", "constant"),
        _entry(behaviour, "gspo", "group_norm", "response"),
        _entry(behaviour, "cispo", "group_norm", "token"),
        _entry(behaviour, "tis", "group_norm", "response"),
        _entry(behaviour, "m2po", "group_norm", "token"),
        _entry(behaviour, "decoupled_ppo", "group_norm", "response", proximal=True),
    )
}
CURRENT_POLICY = tuple(name for name, o in OBJECTIVES.items() if not o.needs_behaviour)


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ObjectiveError(f"unknown objective '{name}'; known: {', '.join(OBJECTIVES)}") from None


def advantage_method(cfg: ObjectiveConfig) -> str:
    """The advantage estimator to use: the configured one, else the objective's default."""
    return cfg.advantage or get_objective(cfg.name).default_advantage


def _check(inputs: LossInputs, spec: Objective) -> None:
    """Fail with a message that says what to change, not with a shape error deep inside torch."""
    lp = inputs.logprobs
    if lp.dim() != 2 or inputs.mask.shape != lp.shape or inputs.mask.dtype != torch.bool:
        raise ObjectiveError(
            f"logprobs and mask must be [B, T] with a bool mask; got {tuple(lp.shape)}, "
            f"{tuple(inputs.mask.shape)} {inputs.mask.dtype}"
        )
    if inputs.advantages.shape != lp.shape[:1] or inputs.group_ids.shape != lp.shape[:1]:
        raise ObjectiveError(f"advantages and group_ids must be [B] = [{lp.shape[0]}]")
    if spec.needs_behaviour and inputs.behaviour_logprobs is None:
        raise ObjectiveError(
            f"objective '{spec.name}' needs behaviour log-probs from the rollout engine; use a "
            f"current-policy objective ({', '.join(CURRENT_POLICY)}) or an engine that returns them"
        )
    if spec.needs_proximal and inputs.proximal_logprobs is None:
        raise ObjectiveError(
            f"objective '{spec.name}' needs proximal log-probs (a no-grad forward pass with "
            "the learner's weights at the start of the step)"
        )
    for what, x in (("behaviour", inputs.behaviour_logprobs), ("proximal", inputs.proximal_logprobs)):
        if x is not None and x.shape != lp.shape:
            raise ObjectiveError(f"{what} log-probs have shape {tuple(x.shape)}, logprobs {tuple(lp.shape)}")


def compute_loss(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """The scalar loss to backpropagate and a dict of plain-float diagnostics (undefined ones omitted)."""
    spec = get_objective(cfg.name)
    _check(inputs, spec)
    loss, contrib = spec.fn(inputs, cfg)
    metrics = response_diagnostics(inputs, contrib)  # "loss" is the objective's part, without the KL term
    if cfg.kl_coef > 0:
        kl = kl_penalty(inputs, cfg)
        loss = loss + cfg.kl_coef * kl
        metrics["kl_ref"] = float(kl.detach())
    with torch.no_grad():
        extra = spec.diagnostics(inputs, cfg) if spec.diagnostics else {}
        if inputs.behaviour_logprobs is not None:  # k1 estimate of KL(behav || current) on engine samples
            log_ratio = fixed_logprobs(inputs, "behaviour") - inputs.logprobs.detach()
            extra["behaviour_kl"] = token_mean(log_ratio, inputs.mask)
        if extra:
            values = torch.stack([v.double() for v in extra.values()]).tolist()
            metrics.update(zip(extra, values, strict=True))
    return loss, metrics


__all__ = [
    "OBJECTIVES",
    "LossInputs",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveError",
    "advantage_method",
    "compute_loss",
    "get_objective",
]
