"""What every asynchronous backend (local processes, Ray actors, a remote server) shares: the bounded-
staleness buffer, the seeds of its jobs and the busy-time metrics."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from asympo.data.tasks import Problem
from asympo.rollout.base import Sample

Scorer = Callable[[list[tuple[str, str]]], list[float]]  # (text, answer) pairs -> rewards, in order


def reward_groups(problems: list[Problem], groups: list[list[Sample]], score: Scorer) -> None:
    """Score single-turn responses in one call (the reward guard batches it); an environment's episodes
    come rewarded by their environment."""
    pairs = [(p, s) for p, group in zip(problems, groups, strict=True) for s in group]
    for p, s in pairs:
        s.answer = p.answer
    unscored = [s for _, s in pairs if s.model_mask is None]
    if unscored:
        for s, reward in zip(unscored, score([(s.text, s.answer) for s in unscored]), strict=True):
            s.reward = reward


def job_seed(seed: int, cursor: int) -> int:
    """The sampling seed of a job: the data cursor survives a resume, so no noise is ever drawn twice."""
    return seed * 1_000_003 + cursor


@dataclass
class Job:
    """Prompts sent to one rollout worker (a process or a Ray actor), with the seed of their sampling."""

    problems: list[Problem]
    seed: int
    id: int = 0  # the local runtime's key for the answer that comes back through its pipe


class StalenessBuffer:
    """Rewarded groups waiting for the learner, oldest first.

    A group is kept only while `learner_version - group_version <= max_staleness`; what falls out is counted
    in `dropped`, so the metrics show how much generation the bound threw away.
    """

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.groups: deque[list[Sample]] = deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: list[Sample]) -> None:
        self.groups.append(group)

    def add_rewarded(self, problems: list[Problem], groups: list[list[Sample]], score: Scorer) -> None:
        """Score a job's groups in one call (the reward guard batches it) and queue them."""
        reward_groups(problems, groups, score)
        for group in groups:
            self.add(group)

    def evict_stale(self, learner_version: int) -> int:
        """Counted from a group's oldest token: with in-flight updates its samples may span versions."""
        fresh = [g for g in self.groups if learner_version - min(s.version for s in g) <= self.max_staleness]
        dropped = len(self.groups) - len(fresh)
        self.dropped += dropped
        self.groups = deque(fresh)
        return dropped

    def take(self, n: int) -> list[Sample]:
        """The `n` oldest groups as one flat batch, each sample tagged with its group index."""
        samples = []
        for gid in range(n):
            for s in self.groups.popleft():
                s.group = gid
                samples.append(s)
        return samples


def publish_latencies(first_tokens: deque[tuple[int, float]], published: dict[int, float]) -> list[float]:
    """Seconds from each version's publish (wall time, `published`) to the first token an engine drew with
    it (`first_tokens`, drained); a version is counted once, at its first use."""
    out = [t - published.pop(v) for v, t in first_tokens if published.get(v)]
    first_tokens.clear()
    return out


class LatencyMeter:
    """Publish-to-use latencies reported by the workers; each batch reports the p50 and p99 of the last
    `window` (NaN before any)."""

    def __init__(self, window: int = 256):
        self.values: deque[float] = deque(maxlen=window)

    def add(self, values: list[float]) -> None:
        self.values.extend(values)

    def stats(self) -> dict[str, float]:
        if not self.values:
            return {"publish_latency_p50": float("nan"), "publish_latency_p99": float("nan")}
        ordered = sorted(self.values)
        pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
        return {"publish_latency_p50": pick(0.5), "publish_latency_p99": pick(0.99)}


class BusyMeter:
    """How busy the learner and the rollout workers were between two batches, and the workers' token rate."""

    def __init__(self) -> None:
        self.busy_time, self.tokens = 0.0, 0
        self.last_return: float | None = None  # when the learner last got a batch

    def record(self, groups: list[list[Sample]], seconds: float) -> None:
        self.busy_time += seconds
        self.tokens += sum(s.model_tokens for group in groups for s in group)

    def stats(self, entered: float, workers: int = 1) -> dict[str, float]:
        """Called as a batch is handed over; `entered` is when the learner started waiting for it."""
        now = time.perf_counter()
        interval = now - self.last_return if self.last_return is not None else now - entered
        learner_busy = (entered - self.last_return) / interval if self.last_return is not None else 0.0
        worker_busy = self.busy_time / (interval * workers) if interval > 0 else 0.0
        tokens_per_s = self.tokens / self.busy_time if self.busy_time > 0 else float("nan")
        self.busy_time, self.tokens, self.last_return = 0.0, 0, now
        return {
            "rollout_tokens_per_s": tokens_per_s,  # per worker, while generating
            "learner_busy": learner_busy,
            "worker_busy": min(worker_busy, 1.0),
            "wait_time": now - entered,
        }
