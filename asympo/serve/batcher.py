"""One engine thread for the whole server: requests that arrive together decode together.

HTTP threads only parse and tokenize; they queue a `Job` and wait. The engine thread takes every waiting job
with the same sampling settings and runs them as one continuously batched `generate_ids` call, so many small
concurrent requests cost one batch, not one batch each. Weights are swapped under the same lock that covers a
batch, i.e. only between batches, and each job reports the version that generated it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import torch

from asympo.config import SamplingConfig
from asympo.rollout.hf import HFEngine
from asympo.serve.errors import ApiError

# After the first request of a batch arrives, wait this long for the others a client sends at the same moment
# (e.g. the OpenAI engine's `concurrency` requests); a decode step of even the tiny model takes longer.
BATCH_WINDOW = 0.005


@dataclass
class Job:
    prompt_ids: list[list[int]]
    n: int
    sampling: SamplingConfig
    seed: int | None
    responses: list[list[int]] = field(default_factory=list)  # prompt-major: n per prompt
    reasons: list[str] = field(default_factory=list)
    version: int = 0
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[float, float, int]:
        s = self.sampling
        return s.temperature, s.top_p, s.max_new_tokens


def batch_seed(seeds: list[int]) -> int:
    """One seed for a merged batch: a lone request keeps its own seed; several are hashed together, so the
    same set of seeded requests, batched the same way, samples the same tokens in whatever order they came."""
    if len(seeds) == 1:
        return seeds[0] % 2**63
    digest = hashlib.blake2b(",".join(map(str, sorted(seeds))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**63


class Batcher:
    def __init__(self, engine: HFEngine, seed: int = 0, window: float = BATCH_WINDOW):
        self.engine, self.window = engine, window
        self.rng = torch.Generator().manual_seed(seed)  # for unseeded batches; advances batch after batch
        self.lock = threading.Lock()  # held while a batch decodes: weights change only between batches
        self.ready = threading.Condition()
        self.waiting: list[Job] = []
        self.held = 0  # requests submitted and not yet answered: waiting or decoding
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="asympo-engine", daemon=True)
        self.thread.start()

    @property
    def version(self) -> int:
        return self.engine.version

    def submit(self, job: Job) -> Job:
        """Queue the job and wait for its batch to finish; `job.error` is set if the engine failed."""
        with self.ready:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", "unavailable")
            self.waiting.append(job)
            self.held += 1
            self.ready.notify()
        try:
            job.done.wait()
        finally:
            with self.ready:
                self.held -= 1
        return job

    def swap_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        with self.lock:
            self.engine.load_weights(state_dict, version)

    def close(self) -> None:
        """Refuse new jobs and answer every waiting one with a 503; a batch already decoding finishes.
        Never blocks, so a signal handler may call it."""
        with self.ready:
            self.stopping = True
            for job in self.waiting:
                job.error = ApiError(503, "the server is shutting down", "unavailable")
                job.done.set()
            self.waiting.clear()
            self.ready.notify()

    def stop(self) -> None:
        self.close()
        self.thread.join(timeout=30)

    def _take(self) -> list[Job]:
        with self.ready:
            while not self.waiting and not self.stopping:
                self.ready.wait()
            if self.stopping:
                return []
        time.sleep(self.window)
        with self.ready:
            if self.stopping:
                return []
            key = self.waiting[0].key
            batch = [j for j in self.waiting if j.key == key]
            self.waiting = [j for j in self.waiting if j.key != key]
        return batch

    def _run(self) -> None:
        while batch := self._take():
            self._generate(batch)

    def _generate(self, batch: list[Job]) -> None:
        seeds = [j.seed for j in batch]
        if all(s is not None for s in seeds):
            batch.sort(key=lambda j: j.seed)  # rows in a canonical order: arrival order does not matter
            generator = torch.Generator().manual_seed(batch_seed(seeds))
        else:
            generator = self.rng
        flat = [ids for job in batch for ids in job.prompt_ids for _ in range(job.n)]
        try:
            with self.lock:
                version = self.engine.version
                responses, _, reasons = self.engine.generate_ids(flat, batch[0].sampling, generator)
        except Exception as e:  # reported to each waiting client as a 500; the server keeps serving
            for job in batch:
                job.error = e
                job.done.set()
            return
        start = 0
        for job in batch:
            stop = start + len(job.prompt_ids) * job.n
            job.responses, job.reasons, job.version = responses[start:stop], reasons[start:stop], version
            start = stop
            job.done.set()
