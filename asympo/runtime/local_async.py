"""The `async` runtime: rollout workers in their own processes generate continuously while the learner
trains in the main process. Weights travel through shared memory (one copy per publish, no pickling);
a bounded buffer admits a group only while `learner_version - sample_version <= max_staleness`.
"""

from __future__ import annotations

import contextlib
import math
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.multiprocessing as mp

from asympo.config import EnvConfig, RolloutConfig
from asympo.data.tasks import Problem
from asympo.envs.episodes import generate_groups, make_episodes
from asympo.faults import RunAborted, StopWaiting
from asympo.heap import keep_freed_memory
from asympo.lifetime import exit_with_parent
from asympo.models.device import for_engine, resolve
from asympo.models.load import load_policy
from asympo.rollout.base import Sample
from asympo.rollout.hf import HFEngine
from asympo.runtime.buffer import (
    BusyMeter,
    Job,
    LatencyMeter,
    Scorer,
    StalenessBuffer,
    job_seed,
    publish_latencies,
)

CTX = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools or locks


class SharedWeights:
    """The newest published weights in shared memory, guarded by a sequence counter (a seqlock): the
    learner, the only writer, makes it odd while copying in; a worker copies out and retries if the
    counter moved. No lock is held across processes, so a worker killed mid-read blocks nobody."""

    def __init__(self, state_dict: dict[str, torch.Tensor], version: int):
        self.tensors = {k: v.detach().clone().share_memory_() for k, v in state_dict.items()}
        self.version = CTX.Value("q", version, lock=False)
        self.published_at = CTX.Value(
            "d", 0.0, lock=False
        )  # wall time of the publish; 0: the initial weights
        self.seq = CTX.Value("q", 0, lock=False)

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.seq.value += 1
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor.copy_(state_dict[name])
        self.version.value = version
        self.published_at.value = time.time()
        self.seq.value += 1

    def read_into(self, engine) -> tuple[int, float]:
        """Load the newest weights into `engine`; their version and publish time."""
        while True:
            seq = self.seq.value
            if seq % 2 == 0:
                version, published_at = self.version.value, self.published_at.value
                engine.load_weights(self.tensors, version)
                if self.seq.value == seq:
                    return version, published_at
            time.sleep(0.001)


def worker_main(jobs, results, shared: SharedWeights, model: str, rollout: RolloutConfig, opts: dict) -> None:
    """A rollout worker: take a job, pick up the newest weights, generate, send the groups back. With
    `rollout.weight_updates=inflight` it also picks up weights published while it generates, between two
    decode steps (a read of the shared version counter per step).

    It exits when its job pipe closes, which is also what happens when the trainer dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle, with a checkpoint
    exit_with_parent()  # also when the trainer is SIGKILLed mid-job (the pipe tells only between jobs)
    keep_freed_memory()
    torch.set_num_threads(opts["threads"])
    policy, tokenizer = load_policy(model)
    policy = for_engine(policy, resolve(opts["device"], opts["precision"], policy))
    engine = HFEngine(
        policy,
        tokenizer,
        version=-1,
        return_logprobs=opts["return_logprobs"],
        max_batch=rollout.max_batch,
        inflight_kv=rollout.inflight_kv,
    )
    episodes = make_episodes(opts["env"], tokenizer)
    published: dict[int, float] = {}  # versions loaded and not yet used: their publish times

    def refresh() -> bool:
        if shared.version.value == engine.version:
            return False
        first = engine.version < 0
        version, published_at = shared.read_into(engine)
        if not first:  # the first load waits for the model to load: no publish-to-use latency
            published[version] = published_at
        return True

    inflight = refresh if rollout.weight_updates == "inflight" else None
    try:
        while (job := jobs.recv()) is not None:
            refresh()
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(job.seed)
            groups = generate_groups(
                engine, job.problems, rollout.group_size, rollout, generator, inflight, episodes
            )
            if inflight is None:  # versions published while this job generated, unused by it
                for sample in (s for group in groups for s in group):
                    sample.version_end = shared.version.value
            latencies = publish_latencies(engine.first_tokens, published)
            results.send((job.id, groups, time.perf_counter() - start, latencies))
    except (EOFError, BrokenPipeError):
        return


class Worker:
    """One rollout process with its own pipes; a thread here drains its results into the runtime's inbox,
    so the worker never blocks on a full pipe while the learner trains, and its death reads as EOF."""

    def __init__(self, index: int, runtime: AsyncRuntime):
        job_reader, self.jobs = CTX.Pipe(duplex=False)
        self.results, result_writer = CTX.Pipe(duplex=False)
        self.in_flight: dict[int, Job] = {}
        self.process = CTX.Process(
            target=worker_main,
            args=(
                job_reader,
                result_writer,
                runtime.shared,
                runtime.model,
                runtime.rollout,
                runtime.opts[index],
            ),
            name=f"asympo-rollout-{index}",
            daemon=True,
        )
        self.process.start()
        job_reader.close()  # only the child's copies stay open: its death closes the pipes
        result_writer.close()
        self.receiver = threading.Thread(target=self._receive, args=(runtime.inbox,), daemon=True)
        self.receiver.start()

    def _receive(self, inbox: queue.Queue) -> None:
        while True:
            try:
                inbox.put((self, *self.results.recv()))
            except (EOFError, OSError):  # the worker exited or died, perhaps mid-message
                return

    def send(self, job: Job) -> None:
        self.in_flight[job.id] = job
        with contextlib.suppress(OSError):  # it just died: the next check restarts it, counts the job lost
            self.jobs.send(job)

    def stop(self) -> None:
        """Results still in flight are not needed: stop at once rather than wait for queued jobs."""
        self.process.kill()
        self.process.join()
        self.jobs.close()
        self.receiver.join(timeout=5)
        self.results.close()


class AsyncRuntime:
    history = ()
    keeps_every_version = False
    in_process_engine = None
    adapters_only = False

    def __init__(
        self,
        model: str,
        weights: dict[str, torch.Tensor],
        version: int,
        problems: Iterator[Problem],
        score: Scorer,
        rollout: RolloutConfig,
        seed: int,
        workers: int = 1,
        worker_threads: int = 1,
        max_staleness: int = 2,
        jobs_per_worker: int = 2,
        max_worker_restarts: int = 5,
        return_logprobs: bool = True,
        devices: list[str] | None = None,
        precision: str = "fp32",  # the setting (auto, fp32, bf16): each worker resolves it for its device
        env: EnvConfig | None = None,
    ):
        self.model, self.rollout, self.problems, self.score, self.seed = model, rollout, problems, score, seed
        self.max_staleness, self.depth, self.max_restarts = (
            max_staleness,
            jobs_per_worker,
            max_worker_restarts,
        )
        devices = devices or ["cpu"] * workers  # one per worker (see asympo.runtime.devices)
        self.opts = [
            {
                "threads": worker_threads,
                "return_logprobs": return_logprobs,
                "device": d,
                "precision": precision,
                "env": env or EnvConfig(),
            }
            for d in devices
        ]
        self.lag = max_staleness  # what the behaviour-log-prob snapshot store must cover
        self.shared = SharedWeights(weights, version)
        self.learner_version = version
        self.job_prompts = math.ceil(rollout.prompts_per_step / workers)
        self.buffer = StalenessBuffer(max_staleness)
        self.inbox: queue.Queue = queue.Queue()  # (worker, job id, groups, generation seconds, latencies)
        # Generated or generating, at most two batches ahead of the learner: one waiting in the buffer and
        # one on the way. More would only go stale and be dropped when the learner is the slower side.
        self.capacity = 2 * rollout.prompts_per_step
        self.cursor, self.next_job = 0, 0
        self.counts = {"dropped_stale": 0, "worker_restarts": 0, "lost_jobs": 0}
        self.meter = BusyMeter()
        self.latency = LatencyMeter()
        self.workers = [Worker(i, self) for i in range(workers)]
        self.stop_requested: Callable[[], bool] = lambda: False  # the trainer's signal flag

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        self.learner_version = version
        self.shared.publish(weights, version)

    def next_batch(self, step: int, attempt: int = 0) -> tuple[list[Sample], dict[str, float]]:
        # attempt > 0: a further round of the same step (dynamic sampling); the buffer's next groups are fresh
        entered = time.perf_counter()
        while True:
            if self.stop_requested():
                raise StopWaiting
            self._revive_dead()
            self._dispatch()
            self._evict_stale()
            if len(self.buffer) >= self.rollout.prompts_per_step:
                break
            try:
                self._admit(*self.inbox.get(timeout=0.5))
            except queue.Empty:
                continue
            self._collect()
        samples = self.buffer.take(self.rollout.prompts_per_step)
        stats = self.meter.stats(entered, len(self.workers)) | self.latency.stats()
        return samples, stats | {"buffer_groups": len(self.buffer), **self.counts}

    def _dispatch(self) -> None:
        """Keep every worker `depth` jobs deep, unless the buffer would overflow its bound."""
        for worker in self.workers:
            while len(worker.in_flight) < self.depth and self._room():
                problems = [next(self.problems) for _ in range(self.job_prompts)]
                seed = job_seed(self.seed, self.cursor)
                self.cursor += len(problems)
                worker.send(Job(problems, seed, self.next_job))
                self.next_job += 1

    def _room(self) -> bool:
        pending = sum(len(w.in_flight) for w in self.workers) * self.job_prompts
        return len(self.buffer) + pending + self.job_prompts <= self.capacity

    def _collect(self) -> None:
        while True:
            try:
                self._admit(*self.inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(
        self, worker: Worker, job_id: int, groups: list[list[Sample]], busy: float, latencies: list[float]
    ) -> None:
        job = worker.in_flight.pop(job_id)
        self.meter.record(groups, busy)
        self.latency.add(latencies)
        self.buffer.add_rewarded(job.problems, groups, self.score)

    def _evict_stale(self) -> None:
        """Drop groups too old to train on: the bound that keeps staleness at most `max_staleness`."""
        self.counts["dropped_stale"] += self.buffer.evict_stale(self.learner_version)

    def _revive_dead(self) -> None:
        for i, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            worker.receiver.join(timeout=5)  # its last complete results are in the inbox now
            self._collect()
            self.counts["worker_restarts"] += 1
            self.counts["lost_jobs"] += len(worker.in_flight)
            worker.stop()
            if self.counts["worker_restarts"] > self.max_restarts:
                raise RunAborted(
                    f"rollout workers died {self.counts['worker_restarts']} times "
                    f"(limit faults.max_worker_restarts={self.max_restarts})"
                )
            self.workers[i] = Worker(i, self)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
