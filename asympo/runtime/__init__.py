"""Runtimes decide which policy version generates each batch: `sync`, `lag` and `async`."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.config import TrainConfig
from asympo.data.tasks import Problem
from asympo.rollout.hf import HFEngine
from asympo.runtime.lag import LagRuntime, Scorer
from asympo.runtime.local_async import AsyncRuntime

Runtime = LagRuntime | AsyncRuntime


def runtime_lag(mode: str, lag: int) -> int:
    """`sync` is generate-then-train with the newest weights, i.e. a lag of exactly 0."""
    return 0 if mode == "sync" else lag


def build_runtime(
    cfg: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    version: int,
    problems: Iterator[Problem],
    cursor: int,
    score: Scorer,
) -> Runtime:
    """The runtime for `cfg.runtime.mode`; `problems` starts at the data cursor `cursor`."""
    engine_logprobs = cfg.behaviour.compare or cfg.behaviour.source == "engine"
    if cfg.runtime.mode == "async":
        torch.set_num_threads(cfg.runtime.learner_threads)  # the other cores belong to the workers
        runtime = AsyncRuntime(
            cfg.model,
            model.state_dict(),
            version,
            problems,
            score,
            cfg.rollout,
            cfg.seed,
            workers=cfg.runtime.workers,
            worker_threads=cfg.runtime.worker_threads,
            max_staleness=cfg.runtime.max_staleness,
            jobs_per_worker=cfg.runtime.jobs_per_worker,
            max_worker_restarts=cfg.faults.max_worker_restarts,
            return_logprobs=engine_logprobs,
        )
    else:
        engine = HFEngine(
            copy.deepcopy(model), tokenizer, return_logprobs=engine_logprobs, max_batch=cfg.rollout.max_batch
        )
        lag = runtime_lag(cfg.runtime.mode, cfg.runtime.lag)
        runtime = LagRuntime(engine, problems, score, cfg.rollout, lag, cfg.seed)
    runtime.cursor = cursor
    return runtime


__all__ = [
    "AsyncRuntime",
    "LagRuntime",
    "Runtime",
    "build_runtime",
    "runtime_lag",
]
