"""`compute_loss`, the one entry point the learner calls, over the registered objectives.

Each objective is a pure function (LossInputs, ObjectiveConfig) -> (loss, per-response contributions [B]),
registered where it is defined (asympo.objectives.registry); the contributions sum to the loss, which is
what lets the diagnostics split it by advantage sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asympo.config import OBJECTIVE_NAMES, ObjectiveConfig
from asympo.objectives import behaviour, current  # noqa: F401 - importing them registers their losses
from asympo.objectives.common import (
    LossInputs,
    ObjectiveError,
    fixed_logprobs,
    response_diagnostics,
    token_mean,
)
from asympo.objectives.kl import kl_penalty
from asympo.objectives.registry import OBJECTIVES, Objective, get_objective

if set(OBJECTIVES) != set(OBJECTIVE_NAMES):  # the schema (asympo.config) and the implementations must agree
    raise ImportError(f"objectives {sorted(OBJECTIVES)} registered, {sorted(OBJECTIVE_NAMES)} declared")
for _name in OBJECTIVE_NAMES:  # listed in the schema's order (current-policy first) wherever they are named
    OBJECTIVES[_name] = OBJECTIVES.pop(_name)
CURRENT_POLICY = tuple(name for name, o in OBJECTIVES.items() if not o.needs_behaviour)


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
