"""One step's batch from any runtime, with reward shaping and DAPO's dynamic sampling.

Dynamic sampling drops every group whose rewards are all equal (its advantages are all 0: no gradient) and
draws more rollouts until `prompts_per_step` groups with a reward spread are kept, for at most
`dynamic_sampling_max_rounds` calls of the runtime's `next_batch`. The surplus of the last round is trimmed
(as in DAPO). When the bound is hit first, the step trains on what was kept; when nothing was kept, on the
last round's whole batch, so the step still happens.

Every runtime works as it is: the lag/sync runtime generates each round with the same version
(`history[0]`), so staleness stays exact, and its `attempt` argument gives each round fresh randomness; the
asynchronous runtimes hand over more groups from their buffers. Each runtime's data cursor counts every
problem consumed, dropped ones included, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

from asympo.config import RolloutConfig
from asympo.rewards.shaping import shape_rewards, shaping_metrics
from asympo.rollout.base import Sample

SUMMED = ("rollout_time", "wait_time")  # per-round timings that add up over a step's rounds


def split_groups(samples: list[Sample]) -> list[list[Sample]]:
    """The batch's groups, in order of first appearance."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    return list(groups.values())


def has_spread(group: list[Sample]) -> bool:
    """Whether the rewards differ within the group, i.e. whether its advantages can be non-zero."""
    return len({s.reward for s in group}) > 1


def draw(runtime: Any, step: int, attempt: int) -> tuple[list[Sample], dict[str, float]]:
    # the first round calls next_batch exactly as before, so any runtime (or stand-in) works unchanged
    return runtime.next_batch(step) if attempt == 0 else runtime.next_batch(step, attempt=attempt)


def step_batch(runtime: Any, step: int, rollout: RolloutConfig) -> tuple[list[Sample], dict[str, float]]:
    """The samples the learner trains on at `step`, and the rollout metrics of the rounds that made them."""
    if not rollout.dynamic_sampling:
        samples, stats = runtime.next_batch(step)
        shape_rewards(samples, rollout)
        return samples, stats | shaping_metrics(samples)
    kept: list[list[Sample]] = []
    dropped = rounds = 0
    stats: dict[str, float] = {}
    samples: list[Sample] = []
    while len(kept) < rollout.prompts_per_step and rounds < rollout.dynamic_sampling_max_rounds:
        samples, round_stats = draw(runtime, step, rounds)
        rounds += 1
        shape_rewards(samples, rollout)  # the check is on the rewards that make the advantages
        for key in SUMMED:
            if key in stats and key in round_stats:
                round_stats[key] += stats[key]
        stats |= round_stats
        for group in split_groups(samples):
            if has_spread(group):
                kept.append(group)
            else:
                dropped += 1
    if kept:
        kept = kept[: rollout.prompts_per_step]  # the surplus of the last round, as in DAPO
        samples = []
        for gid, group in enumerate(kept):  # unique group ids across rounds
            for s in group:
                s.group = gid
            samples.extend(group)
    counts = {"groups_dropped": dropped, "sampling_rounds": rounds, "groups_kept": len(kept)}
    return samples, stats | counts | shaping_metrics(samples)
