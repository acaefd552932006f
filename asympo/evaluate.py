"""Held-out evaluation: sampled pass@1 / pass@k / avg@k, greedy accuracy, boxed-rate and mean length.

A response counts as correct when its reward is at least 1 (exact and math rewards give 1 for a correct
answer; a format bonus on top does not make a wrong answer correct). avg@k is the mean reward itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import comb

import torch

from asympo.config import SamplingConfig
from asympo.data.answers import last_boxed
from asympo.data.tasks import Problem
from asympo.envs.episodes import EpisodeRunner, generate_groups
from asympo.rewards.exact import exact_match
from asympo.rollout.hf import HFEngine

Scorer = Callable[[list[tuple[str, str]]], list[float]]


def score_exact(items: list[tuple[str, str]]) -> list[float]:
    return [exact_match(text, answer) for text, answer in items]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class Tally:
    """Per-problem counts over its samples, plus response-level sums."""

    correct: list[int] = field(default_factory=list)
    reward_sum: float = 0.0
    boxed: int = 0
    tokens: int = 0
    responses: int = 0
    env: dict[str, float] = field(default_factory=dict)  # episodes: each info key summed over responses


def tally(
    engine: HFEngine,
    problems: list[Problem],
    n: int,
    sampling: SamplingConfig,
    seed: int = 0,
    score: Scorer = score_exact,
    chunk: int = 256,
    advance: Callable[[int], None] = lambda _: None,
    episodes: EpisodeRunner | None = None,
) -> Tally:
    """With `episodes`, each sample is an environment's episode and its reward the environment's."""
    out = Tally()
    generator = torch.Generator().manual_seed(seed)
    per_chunk = max(1, chunk // n)
    for i in range(0, len(problems), per_chunk):
        part = problems[i : i + per_chunk]
        groups = generate_groups(engine, part, n, sampling, generator, episodes=episodes)
        if episodes is None:
            rewards = iter(score([(s.text, p.answer) for p, g in zip(part, groups, strict=True) for s in g]))
        else:
            rewards = iter([s.reward for g in groups for s in g])
        for group in groups:
            values = [next(rewards) for _ in group]
            out.correct.append(sum(v >= 1.0 for v in values))
            out.reward_sum += sum(values)
            out.boxed += sum(last_boxed(s.text) is not None for s in group)
            out.tokens += sum(s.model_tokens for s in group)
            out.responses += len(group)
            for s in group:
                for key, value in s.extra.get("env", {}).items():
                    out.env[key] = out.env.get(key, 0.0) + value
        advance(len(part))
    return out


def greedy_accuracy(
    engine: HFEngine,
    problems: list[Problem],
    max_new_tokens: int,
    score: Scorer = score_exact,
    episodes: EpisodeRunner | None = None,
) -> float:
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    return sum(tally(engine, problems, 1, sampling, score=score, episodes=episodes).correct) / len(problems)


def sampled_metrics(t: Tally, k: int) -> dict[str, float]:
    problems = len(t.correct)
    return {
        "pass@1": sum(pass_at_k(k, c, 1) for c in t.correct) / problems,
        f"pass@{k}": sum(pass_at_k(k, c, k) for c in t.correct) / problems,
        f"avg@{k}": t.reward_sum / t.responses,
        "boxed_rate": t.boxed / t.responses,
        "mean_length": t.tokens / t.responses,  # the model's tokens (episodes: all its turns)
        **{f"env_{key}": value / t.responses for key, value in sorted(t.env.items())},
    }


def held_out_accuracy(
    engine: HFEngine,
    problems: list[Problem],
    samples: int,
    sampling: SamplingConfig,
    seed: int = 0,
    score: Scorer = score_exact,
    episodes: EpisodeRunner | None = None,
) -> dict[str, float]:
    """The headline metric is sampled pass@1 at the training temperature: it is what RL optimises, and it
    moves smoothly. Greedy accuracy of a tiny model jumps by many points between nearby weights, so it is
    reported alongside, not instead. With `episodes`, the environment's info means follow (`env_turns`,
    `env_used_tool`, ...); accuracy is then episode success (a reward of at least 1)."""
    tallied = tally(engine, problems, samples, sampling, seed, score, episodes=episodes)
    sampled = sampled_metrics(tallied, samples)
    return {
        "accuracy": sampled["pass@1"],
        f"pass@{samples}": sampled[f"pass@{samples}"],
        "greedy_accuracy": greedy_accuracy(engine, problems, sampling.max_new_tokens, score, episodes),
        **{key: value for key, value in sampled.items() if key.startswith("env_")},
    }
