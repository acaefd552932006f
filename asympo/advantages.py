"""Group-relative advantages: each response is scored against the other responses to the same prompt.

Groups are given by id, need not be contiguous, and are handled with scatter ops (no Python loop over
groups), so one call covers a whole batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageMethod = Literal["group_norm", "mean", "loo"]
ADVANTAGE_METHODS: tuple[str, ...] = ("group_norm", "mean", "loo")


def _dense_ids(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to 0..G-1 so they can index scatter buffers."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, uniq.numel()


def _group_sum(values: Tensor, index: Tensor, groups: int) -> Tensor:
    return values.new_zeros(groups).index_add_(0, index, values)


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """Mean of `values` over each element's group, broadcast back to shape [B]."""
    index, groups = _dense_ids(group_ids)
    counts = _group_sum(torch.ones_like(values), index, groups)
    return (_group_sum(values, index, groups) / counts)[index]


def group_advantages(
    rewards: Tensor, group_ids: Tensor, method: AdvantageMethod = "group_norm", eps: float = 1e-6
) -> Tensor:
    """Advantages [B] from rewards [B] and group ids [B].

    - group_norm: (r - mean_g) / (std_g + eps), the GRPO form. std is the population std (unbiased=False):
      it is defined for groups of any size and makes a group's advantages have unit RMS.
    - mean: r - mean_g, the Dr.GRPO form (no std division, so no per-prompt difficulty reweighting).
    - loo: r_i - mean_{j != i} r_j, the RLOO baseline, equal to n/(n-1) (r_i - mean_g); 0 for a group of one.

    A group whose rewards are all equal gets exact zeros: rounding in the group mean would otherwise leave
    ~1e-17 residues that group_norm would blow up to ~1e-11 (and sign noise) after dividing by a ~0 std.
    """
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"unknown advantage method '{method}'; known: {', '.join(ADVANTAGE_METHODS)}")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        shapes = f"{tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        raise ValueError(f"rewards and group_ids must both be [B]; got {shapes}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    index, groups = _dense_ids(group_ids)
    counts = _group_sum(torch.ones_like(rewards), index, groups)
    centred = rewards - (_group_sum(rewards, index, groups) / counts)[index]
    high = rewards.new_full((groups,), -torch.inf).scatter_reduce(0, index, rewards, "amax")
    low = rewards.new_full((groups,), torch.inf).scatter_reduce(0, index, rewards, "amin")
    constant = (high == low)[index]
    n = counts[index]
    if method == "group_norm":
        std = (_group_sum(centred.square(), index, groups) / counts).sqrt()[index]
        adv = centred / (std + eps)
    elif method == "mean":
        adv = centred
    else:
        adv = centred * n / (n - 1).clamp(min=1)
    return torch.where(constant, torch.zeros_like(adv), adv)
