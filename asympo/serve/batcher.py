"""One engine thread for the whole server: requests that arrive together decode together.

HTTP threads only parse and tokenize; they queue a `Job` and wait. The engine thread takes every waiting job
with the same sampling settings and runs them as one continuously batched `generate_ids` call, so many small
concurrent requests cost one batch, not one batch each. Weights are swapped under the same lock that covers a
batch, i.e. only between batches, and each job reports the version that generated it.

What differs between jobs of one batch (stop strings, log-probs, streaming, a client gone) is handled per
sequence by `Watch`, which the engine calls after every decode step.
"""

from __future__ import annotations

import copy
import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from asympo.config import SamplingConfig
from asympo.rollout.hf import HFEngine
from asympo.serve.errors import ApiError
from asympo.serve.logprobs import TokenScores, rows, score_prompt

# After the first request of a batch arrives, wait this long for the others a client sends at the same moment
# (e.g. the OpenAI engine's `concurrency` requests); a decode step of even the tiny model takes longer.
BATCH_WINDOW = 0.005


@dataclass
class Job:
    prompt_ids: list[list[int]]
    n: int
    sampling: SamplingConfig
    seed: int | None
    stops: tuple[str, ...] = ()  # a sequence ends once its text contains one of these
    top: int | None = None  # score each generated token, with this many alternatives; None: no log-probs
    echo: bool = False  # score the prompt's tokens too (`prompt_scores`), with `top` (or 0) alternatives
    generate: bool = True  # False: score the prompt only (`max_tokens=0` with `echo`)
    stream: queue.SimpleQueue | None = None  # (sequence, token, log-prob or None, finish reason or None)
    cancelled: bool = False  # the client went away: its sequences end at the next step
    responses: list[list[int]] = field(default_factory=list)  # prompt-major: n per prompt
    reasons: list[str] = field(default_factory=list)
    scores: list[TokenScores] = field(default_factory=list)  # per sequence, when `top` is set
    prompt_scores: list[TokenScores] = field(default_factory=list)  # per prompt, with `echo`
    version: int = 0
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[float, float, int, bool]:
        s = self.sampling
        return s.temperature, s.top_p, s.max_new_tokens, self.generate

    @property
    def sequences(self) -> int:
        return len(self.prompt_ids) * self.n if self.generate else 0

    def finish(self, error: Exception | None = None) -> None:
        self.error = self.error or error
        self.done.set()
        if self.stream is not None:
            self.stream.put(None)  # wakes a streaming reply: the job is over


class Watch:
    """The engine's per-step hook for one batch: records log-probs, ends sequences at a stop string or when
    their client has gone, and feeds streaming replies token by token."""

    def __init__(self, batch: list[Job], engine: HFEngine, tokenizer: object):
        self.seqs = [(job, i) for job in batch for i in range(job.sequences)]
        self.ids: list[list[int]] = [[] for _ in self.seqs]
        self.eos, self.tokenizer = engine.eos_id, tokenizer
        self.max_new = batch[0].sampling.max_new_tokens
        self.top = max((job.top for job in batch if job.top is not None), default=None)
        for job in batch:
            if job.top is not None:
                job.scores = [TokenScores() for _ in range(job.sequences)]

    def __call__(self, seqs: list[int], tokens: torch.Tensor, logits: torch.Tensor) -> set[int]:
        token_list = tokens.tolist()
        picked: list[float | None] = [None] * len(seqs)
        if self.top is not None:
            want = [r for r, seq in enumerate(seqs) if self.seqs[seq][0].top is not None]
            if want:
                index = torch.tensor(want, device=tokens.device)
                lps, tops = rows(logits[index], tokens[index], self.top)
                for r, lp, best in zip(want, lps, tops, strict=True):
                    job, i = self.seqs[seqs[r]]
                    picked[r] = lp
                    scores = job.scores[i]
                    scores.ids.append(token_list[r])
                    scores.logprobs.append(lp)
                    scores.tops.append(best[: job.top])
        ended = set()
        for r, (seq, token) in enumerate(zip(seqs, token_list, strict=True)):
            job, i = self.seqs[seq]
            ids = self.ids[seq]
            ids.append(token)
            reason = "stop" if token == self.eos else None
            if job.cancelled or (reason is None and job.stops and self._hit(ids, job.stops)):
                ended.add(seq)
                reason = "stop"
            elif reason is None and len(ids) >= self.max_new:
                reason = "length"
            if job.stream is not None:
                job.stream.put((i, token, picked[r], reason))
        return ended

    def _hit(self, ids: list[int], stops: tuple[str, ...]) -> bool:
        """Whether the text now holds a stop string. It can only have appeared at the end, so only the last
        tokens are decoded: a token is at least one byte and a character at most four."""
        window = 4 * max(len(s) for s in stops) + 8
        tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in tail for s in stops)


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
        try:  # the engine thread's own copy: a Rust tokenizer may refuse two threads at once
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:
            self.tokenizer = engine.tokenizer
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
        self.enqueue(job)
        job.done.wait()
        return job

    def enqueue(self, job: Job) -> Job:
        """Queue the job and return at once (a streaming reply reads `job.stream` as it fills)."""
        with self.ready:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", "unavailable")
            self.waiting.append(job)
            self.held += 1
            self.ready.notify()
        return job

    def _finish(self, job: Job, error: Exception | None = None) -> None:
        with self.ready:
            self.held -= 1
        job.finish(error)

    def swap_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        with self.lock:
            self.engine.load_weights(state_dict, version)

    def close(self) -> None:
        """Refuse new jobs and answer every waiting one with a 503; a batch already decoding finishes.
        Never blocks, so a signal handler may call it."""
        with self.ready:
            self.stopping = True
            for job in self.waiting:
                self.held -= 1
                job.finish(ApiError(503, "the server is shutting down", "unavailable"))
            self.waiting.clear()
            self.ready.notify()

    def stop(self) -> None:
        self.close()
        self.thread.join(timeout=30)

    def _take(self) -> list[Job]:
        """The next batch: every waiting job with the first one's sampling settings. [] once stopping."""
        while True:
            with self.ready:
                while not self.waiting and not self.stopping:
                    self.ready.wait()
                if self.stopping:
                    return []
            time.sleep(self.window)
            with self.ready:
                if self.stopping:
                    return []
                for job in [j for j in self.waiting if j.cancelled]:  # the client left before its turn
                    self.waiting.remove(job)
                    self.held -= 1
                    job.finish()
                if not self.waiting:
                    continue
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
        flat = [ids for job in batch if job.generate for ids in job.prompt_ids for _ in range(job.n)]
        try:
            with self.lock:
                version = self.engine.version
                for job in batch:
                    if job.echo:
                        top = job.top or 0
                        job.prompt_scores = [score_prompt(self.engine.model, x, top) for x in job.prompt_ids]
                responses, reasons = [], []
                if flat:
                    watch = Watch(batch, self.engine, self.tokenizer)
                    sampling = batch[0].sampling
                    responses, _, reasons = self.engine.generate_ids(flat, sampling, generator, watch)
        except Exception as e:  # reported to each waiting client as a 500; the server keeps serving
            for job in batch:
                self._finish(job, e)
            return
        start = 0
        for job in batch:
            stop = start + job.sequences
            job.responses, job.reasons, job.version = responses[start:stop], reasons[start:stop], version
            start = stop
            self._finish(job)
