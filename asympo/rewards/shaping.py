"""DAPO's overlong shaping: a soft length penalty near the cap, and a filter that takes truncated
responses out of the loss.

The penalty (DAPO, eq. 13), with L_max = rollout.max_new_tokens and L_cache = rollout.overlong_buffer:

    R_length(y) = 0                                    if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                = -1                                   if |y| > L_max

times `rollout.overlong_penalty`, added to the task reward before advantages are formed (and before dynamic
sampling looks for groups of equal rewards). The task reward stays in `Sample.extra["task_reward"]`, so
accuracy is still counted on it.
"""

from __future__ import annotations

import torch

from asympo.batch import TrainBatch
from asympo.config import RolloutConfig
from asympo.rollout.base import Sample


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """The (non-positive) length penalty of a response of `length` tokens; 0 when `buffer` is 0."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return ((max_len - buffer) - length) / buffer * factor
    return -factor


def shape_rewards(samples: list[Sample], rollout: RolloutConfig) -> None:
    """Add the overlong penalty to each sample's reward, in place (once: the task reward is kept in
    `extra["task_reward"]`); a no-op when `overlong_buffer` is 0."""
    if not rollout.overlong_buffer:
        return
    for s in samples:
        penalty = overlong_penalty(
            len(s.response_ids), rollout.max_new_tokens, rollout.overlong_buffer, rollout.overlong_penalty
        )
        s.extra.setdefault("task_reward", s.reward)
        s.reward = s.extra["task_reward"] + penalty


def shaping_metrics(samples: list[Sample]) -> dict[str, float]:
    """The mean penalty of a shaped batch ({} when nothing was shaped)."""
    shaped = [s.reward - s.extra["task_reward"] for s in samples if "task_reward" in s.extra]
    return {"overlong_penalty_mean": sum(shaped) / len(samples)} if shaped else {}


def filter_truncated(batch: TrainBatch, samples: list[Sample]) -> int:
    """DAPO's overlong filtering, in place: rows of truncated responses (finish_reason "length") get no
    gradient. Their response tokens leave the loss mask and their advantages become 0; the other responses'
    advantages, computed with the truncated ones in their groups, stay as they are (as in DAPO). A fully
    masked row adds exactly 0 under every aggregation. Returns how many rows were filtered."""
    rows = torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool)
    if not rows.any():
        return 0
    batch.response_mask = batch.response_mask.clone()
    batch.response_mask[rows] = False
    batch.advantages = torch.where(rows, torch.zeros_like(batch.advantages), batch.advantages)
    return int(rows.sum())
