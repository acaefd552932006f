"""The `async` runtime for a remote rollout server: a background thread keeps asking the server for batches
while the learner trains, under the same staleness bound and with the same metrics as the local processes.

The server does the generating, so one thread is enough here: it pushes the newest published weights before
each request (they take effect between the server's batches) and hands the groups over. With vLLM and
`rollout.weight_updates=inflight` it also loads them between two of vLLM's decode steps (asympo.rollout.vllm).
Rewards are scored in the learner's thread, as in the local runtime (the reward guard serves one caller at a
time). A failure in the thread (the server gone for good) is raised in the learner's next `next_batch`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import torch

from asympo.config import RolloutConfig
from asympo.data.tasks import Problem
from asympo.envs.episodes import EpisodeRunner, generate_groups
from asympo.faults import StopWaiting
from asympo.rollout.base import RolloutEngine, Sample
from asympo.runtime.buffer import (
    BusyMeter,
    LatencyMeter,
    Scorer,
    StalenessBuffer,
    job_seed,
    publish_latencies,
)


class RemoteAsyncRuntime:
    history = ()
    keeps_every_version = False
    in_process_engine = None
    adapters_only = False

    def __init__(
        self,
        engine: RolloutEngine,
        problems: Iterator[Problem],
        score: Scorer,
        rollout: RolloutConfig,
        seed: int,
        max_staleness: int = 2,
        episodes: EpisodeRunner | None = None,
    ):
        self.engine, self.problems, self.score, self.episodes = engine, problems, score, episodes
        self.rollout, self.seed = rollout, seed
        self.lag = max_staleness  # what the behaviour-log-prob snapshot store must cover
        self.buffer = StalenessBuffer(max_staleness)  # touched by the learner's thread only
        self.inbox: list[tuple[list[Problem], list[list[Sample]]]] = []  # generated, not yet rewarded
        # Generated or generating, at most two batches ahead of the learner (as in the local async runtime).
        self.capacity = 2 * rollout.prompts_per_step
        self.cursor = 0
        self.counts = {"dropped_stale": 0}
        self.meter = BusyMeter()  # touched under the lock: the producer records, the learner reads
        self.latency = LatencyMeter()  # publish-to-use, in flight only (an engine that reports first tokens)
        self.published_at: dict[int, float] = {}  # versions published and not yet used: their wall times
        self.learner_version: int | None = None
        self.published: tuple[int, dict[str, torch.Tensor]] | None = None
        self.generating = False
        self.error: BaseException | None = None
        self.stopping = False
        self.changed = threading.Condition()  # guards everything above, shared with the producer thread
        self.thread = threading.Thread(target=self._produce, name="asympo-remote-rollouts", daemon=True)
        self.stop_requested: Callable[[], bool] = lambda: False  # the trainer's signal flag

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Recorded here and pushed by the producer before its next request: the learner never waits on it."""
        with self.changed:
            if self.error is not None:  # the producer gave up (server gone): stop here, with a checkpoint
                raise self.error
            self.learner_version, self.published = version, (version, weights)
            if self.thread.ident is not None and self.rollout.weight_updates == "inflight":
                self.published_at[version] = time.time()  # the first version waits for nothing: no latency
                for old in [v for v in self.published_at if v < version - 64]:  # skipped, never used
                    del self.published_at[old]
            self.changed.notify_all()
        if self.thread.ident is None and not self.stopping:
            self.thread.start()  # the first publish gives the producer weights to start from

    def next_batch(self, step: int, attempt: int = 0) -> tuple[list[Sample], dict[str, float]]:
        # attempt > 0: a further round of the same step (dynamic sampling); the buffer's next groups are fresh
        entered = time.perf_counter()
        while True:
            if self.stop_requested():
                raise StopWaiting
            with self.changed:
                if self.error is not None:
                    raise self.error
                arrived, self.inbox = self.inbox, []
                if not arrived and len(self.buffer) < self.rollout.prompts_per_step:
                    self.changed.wait(timeout=0.5)
            for problems, groups in arrived:
                self.buffer.add_rewarded(problems, groups, self.score)
            self.counts["dropped_stale"] += self.buffer.evict_stale(self.learner_version)
            if len(self.buffer) >= self.rollout.prompts_per_step:
                break
        samples = self.buffer.take(self.rollout.prompts_per_step)
        with self.changed:
            self.changed.notify_all()  # room for the producer again
            stats = self.meter.stats(entered) | self.latency.stats()
        retries = getattr(self.engine, "retries", 0)
        return samples, stats | {"buffer_groups": len(self.buffer), "remote_retries": retries, **self.counts}

    def _room(self) -> bool:
        """Called under the lock; `len(self.buffer)` may be a moment old, which only delays a request."""
        pending = (len(self.inbox) + self.generating) * self.rollout.prompts_per_step
        return len(self.buffer) + pending + self.rollout.prompts_per_step <= self.capacity

    def _produce(self) -> None:
        try:
            while True:
                with self.changed:
                    while not self.stopping and not self._room():
                        self.changed.wait()
                    if self.stopping:
                        return
                    version, weights = self.published
                    problems = [next(self.problems) for _ in range(self.rollout.prompts_per_step)]
                    seed = job_seed(self.seed, self.cursor)
                    self.cursor += len(problems)
                    self.generating = True
                self._generate(problems, seed, version, weights)
        except BaseException as e:  # handed to the learner's thread, which stops the run with it
            with self.changed:
                self.error = e
                self.changed.notify_all()

    def _generate(self, problems: list[Problem], seed: int, version: int, weights: dict) -> None:
        start = time.perf_counter()
        if self.engine.version != version:
            self.engine.load_weights(weights, version)
        generator = torch.Generator().manual_seed(seed)
        n, rollout = self.rollout.group_size, self.rollout
        inflight = self._refresh if rollout.weight_updates == "inflight" else None
        groups = generate_groups(self.engine, problems, n, rollout, generator, inflight, self.episodes)
        elapsed = time.perf_counter() - start
        with self.changed:
            self.generating = False
            first_tokens = getattr(self.engine, "first_tokens", None)
            if inflight is not None and first_tokens is not None:
                self.latency.add(publish_latencies(first_tokens, self.published_at))
            self.meter.record(groups, elapsed)
            self.inbox.append((problems, groups))
            self.changed.notify_all()

    def _refresh(self) -> bool:
        """Between two decode steps: load the newest published version if the engine has an older one."""
        with self.changed:
            version, weights = self.published
        if version == self.engine.version:
            return False
        self.engine.load_weights(weights, version)
        return True

    def close(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=10)  # a request still out is abandoned (the thread is a daemon)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
