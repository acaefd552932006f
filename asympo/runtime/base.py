"""The one interface every runtime implements (sync/lag, local async, remote async, Ray), so the training
loop calls it without asking which one it has; a unit test checks each runtime class against it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from asympo.rollout.base import Sample
from asympo.rollout.hf import HFEngine

Weights = dict[str, torch.Tensor]


class Runtime(Protocol):
    cursor: int
    """Problems consumed so far: the data cursor a checkpoint saves."""
    lag: int
    """How many versions back a trained sample can come from (what the behaviour snapshot store covers)."""
    counts: dict[str, int]
    """Counters a checkpoint keeps and the metrics show (dropped_stale, worker_restarts, lost_jobs)."""
    history: Sequence[tuple[int, Weights]]
    """Versions a checkpoint must keep for the run to continue exactly (the lag runtime's); else empty."""
    keeps_every_version: bool
    """Every optimiser update is published, not only each batch's last (lag mode: a rollout k versions back
    may come from any of them)."""
    adapters_only: bool
    """`publish` takes the LoRA adapters alone (the engines hold the base)."""
    in_process_engine: HFEngine | None
    """An engine in this process that evaluation may borrow (it reloads its own version afterwards)."""
    stop_requested: Callable[[], bool]
    """Set by the trainer: a runtime waiting for rollouts gives up when it turns true (a signal)."""

    def publish(self, version: int, weights: Weights) -> None:
        """Make `version` the newest policy for rollouts."""
        ...

    def next_batch(self, step: int, attempt: int = 0) -> tuple[list[Sample], dict[str, float]]:
        """One batch of rewarded groups and its rollout metrics; `attempt` > 0 refills the same step."""
        ...

    def close(self) -> None:
        """Stop every worker, thread and engine process the runtime started."""
        ...
