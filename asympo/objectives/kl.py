"""The KL penalty to a frozen reference policy, added to any objective when `kl_coef > 0`.

With r = pi_ref(y_t) / pi(y_t) on the sampled tokens, the three estimators of KL(pi || pi_ref) are
k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2 (low variance, biased) and
k3 = (r - 1) - log r (unbiased and never negative: GRPO's choice). The penalty is the token mean over the
whole batch (the `total_tokens` normaliser), so micro-batches add up like the losses do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asympo.config import ObjectiveConfig
from asympo.objectives.common import LossInputs, ObjectiveError, fixed_logprobs, masked


def kl_estimate(logprobs: Tensor, reference: Tensor, estimator: str) -> Tensor:
    """Token-level estimate of KL(pi || pi_ref) from current and reference log-probs of the same tokens."""
    log_r = reference - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ObjectiveError(f"unknown kl_estimator '{estimator}'; known: k1, k2, k3")


def kl_penalty(inputs: LossInputs, cfg: ObjectiveConfig) -> Tensor:
    """The batch-normalised token sum of the estimator (differentiable through the current log-probs)."""
    if inputs.reference_logprobs is None:
        raise ObjectiveError("objective.kl_coef > 0 needs reference log-probs (from the learner's reference)")
    reference = fixed_logprobs(inputs, "reference")
    current = masked(inputs.logprobs, inputs.mask)
    return masked(kl_estimate(current, reference, cfg.kl_estimator), inputs.mask).sum() / inputs.n_tokens
