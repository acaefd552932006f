"""What every objective shares: its inputs, its config, masked reductions, aggregation and diagnostics.

Padding positions may hold anything (nan, inf, garbage). `masked` replaces them with 0 through
torch.where *before* any arithmetic: x * mask would turn nan into nan, and a nan computed at a padded
position would leak into the gradient even if it were masked out later (0 * nan = nan in backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from asympo.errors import UserError


class ObjectiveError(UserError, ValueError):
    """A loss cannot be computed as configured (missing inputs, unknown name); the message is one line."""


@dataclass(frozen=True)
class LossInputs:
    """One (micro-)batch as the objectives see it. Token tensors are [B, T]; per-response ones are [B]."""

    logprobs: Tensor  # current-policy token log-probs (requires grad)
    mask: Tensor  # bool, True on response tokens; padding may hold any value, incl. nan/inf
    advantages: Tensor
    group_ids: Tensor
    behaviour_logprobs: Tensor | None = None  # from the rollout engine (behaviour policy)
    proximal_logprobs: Tensor | None = None  # learner weights at step start, no grad (decoupled_ppo)
    reference_logprobs: Tensor | None = None  # the frozen reference policy, no grad (kl_coef > 0)
    total_responses: int | None = None  # normaliser across micro-batches (default: B of this batch)
    total_tokens: int | None = None  # normaliser for token-level aggregation (default: mask.sum())
    max_len: int | None = None  # Dr.GRPO constant length normaliser (default: T)

    @property
    def n_responses(self) -> int:
        return self.total_responses if self.total_responses is not None else self.logprobs.shape[0]

    @property
    def n_tokens(self) -> int | Tensor:
        # at least 1: a batch whose responses were all filtered out (rollout.overlong_filter) adds 0, not nan
        return max(self.total_tokens, 1) if self.total_tokens is not None else self.mask.sum().clamp(min=1)

    @property
    def length_norm(self) -> int:
        return self.max_len if self.max_len is not None else self.logprobs.shape[1]


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """x on response tokens, exactly 0 elsewhere, whatever x holds there (gradient there is 0 too)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def lengths(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Response lengths [B], at least 1 so an empty response divides safely."""
    return mask.sum(-1).clamp(min=1).to(dtype)


def current_logprobs(inputs: LossInputs) -> Tensor:
    """The current-policy log-probs with padding zeroed: the only tensor a loss differentiates through."""
    return masked(inputs.logprobs, inputs.mask)


def fixed_logprobs(inputs: LossInputs, which: Literal["behaviour", "proximal", "reference"]) -> Tensor:
    """Behaviour, proximal or reference log-probs detached (data, not parameters), padding-zeroed."""
    x = getattr(inputs, f"{which}_logprobs")
    if x is None:
        raise ObjectiveError(f"{which} log-probs are missing")
    return masked(x.detach().to(inputs.logprobs.dtype), inputs.mask)


def advantages(inputs: LossInputs) -> Tensor:
    return inputs.advantages.detach().to(inputs.logprobs.dtype)


def mean_nll(inputs: LossInputs) -> Tensor:
    """lbar_i: mean token NLL of each response under the current policy, [B], differentiable."""
    return -current_logprobs(inputs).sum(-1) / lengths(inputs.mask, inputs.logprobs.dtype)


def token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over all response tokens of the batch (a diagnostic, not a loss)."""
    return masked(x, mask).sum() / mask.sum().clamp(min=1)


def aggregate(token_loss: Tensor, inputs: LossInputs, how: str) -> tuple[Tensor, Tensor]:
    """Reduce a [B, T] token loss to (scalar loss, per-response contributions [B]) that sum to it.

    Normalisers come from the whole batch (total_responses / total_tokens), so micro-batch losses add up.
    """
    summed = masked(token_loss, inputs.mask).sum(-1)
    if how == "response":
        contrib = summed / lengths(inputs.mask, summed.dtype) / inputs.n_responses
    elif how == "token":
        contrib = summed / inputs.n_tokens
    elif how == "constant":
        contrib = summed / (inputs.n_responses * inputs.length_norm)
    else:
        raise ObjectiveError(f"unknown aggregation '{how}'; known: response, token, constant")
    return contrib.sum(), contrib


def response_diagnostics(inputs: LossInputs, contrib: Tensor) -> dict[str, float]:
    """The failure-mode view: loss split by advantage sign, and mean NLL of positive vs negative responses.

    Splits use the advantages as given (before any objective-specific shift such as asymre's), so
    loss_pos + loss_neg + (the A == 0 part) == loss. Keys without data (e.g. no negatives) are omitted.
    """
    with torch.no_grad():
        adv, lbar, contrib = inputs.advantages, mean_nll(inputs), contrib.detach()
        pos, neg = adv > 0, adv < 0
        zero = torch.zeros((), dtype=contrib.dtype, device=contrib.device)
        parts = [
            contrib.sum(),
            torch.where(pos, contrib, zero).sum(),
            torch.where(neg, contrib, zero).sum(),
            torch.where(pos, lbar, zero).sum(),
            torch.where(neg, lbar, zero).sum(),
            pos.sum().to(contrib.dtype),
            neg.sum().to(contrib.dtype),
        ]
        values = torch.stack([p.double() for p in parts]).tolist()
    loss, loss_pos, loss_neg, nll_pos_sum, nll_neg_sum, n_pos, n_neg = values
    out = {"loss": loss, "loss_pos": loss_pos, "loss_neg": loss_neg}
    if n_pos:
        out["nll_pos"] = nll_pos_sum / n_pos
    if n_neg:
        out["nll_neg"] = nll_neg_sum / n_neg
        if n_pos and out["nll_neg"] > 0:
            out["nll_ratio"] = out["nll_pos"] / out["nll_neg"]
    return out
