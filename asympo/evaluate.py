"""Held-out evaluation: greedy accuracy, and sampled pass@1 / pass@k."""

from __future__ import annotations

from math import comb

import torch

from asympo.data.tasks import Problem
from asympo.rewards.exact import exact_match
from asympo.rollout.base import SamplingConfig
from asympo.rollout.hf import HFEngine


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _correct_counts(
    engine: HFEngine, problems: list[Problem], n: int, sampling: SamplingConfig, seed: int, chunk: int
) -> list[int]:
    counts = []
    generator = torch.Generator().manual_seed(seed)
    per_chunk = max(1, chunk // n)
    for i in range(0, len(problems), per_chunk):
        part = problems[i : i + per_chunk]
        groups = engine.generate([p.prompt for p in part], n, sampling, generator)
        counts += [
            int(sum(exact_match(s.text, p.answer) for s in g)) for p, g in zip(part, groups, strict=True)
        ]
    return counts


def greedy_accuracy(
    engine: HFEngine, problems: list[Problem], max_new_tokens: int, chunk: int = 256
) -> float:
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    counts = _correct_counts(engine, problems, 1, sampling, 0, chunk)
    return sum(counts) / len(problems)


def sampled_pass_at_k(
    engine: HFEngine,
    problems: list[Problem],
    k: int,
    sampling: SamplingConfig,
    seed: int = 0,
    chunk: int = 256,
) -> dict[str, float]:
    counts = _correct_counts(engine, problems, k, sampling, seed, chunk)
    return {
        "pass@1": sum(pass_at_k(k, c, 1) for c in counts) / len(problems),
        f"pass@{k}": sum(pass_at_k(k, c, k) for c in counts) / len(problems),
    }


def held_out_accuracy(
    engine: HFEngine, problems: list[Problem], samples: int, sampling: SamplingConfig, seed: int = 0
) -> dict[str, float]:
    """The headline metric is sampled pass@1 at the training temperature: it is what RL optimises, and it
    moves smoothly. Greedy accuracy of a tiny model jumps by many points between nearby weights, so it is
    reported alongside, not instead."""
    sampled = sampled_pass_at_k(engine, problems, samples, sampling, seed)
    return {
        "accuracy": sampled["pass@1"],
        f"pass@{samples}": sampled[f"pass@{samples}"],
        "greedy_accuracy": greedy_accuracy(engine, problems, sampling.max_new_tokens),
    }
