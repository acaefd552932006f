"""Runtimes decide which policy version generates each batch: `sync`, `lag` (and later `async`)."""

from __future__ import annotations

from asympo.runtime.lag import LagRuntime


def runtime_lag(mode: str, lag: int) -> int:
    """`sync` is generate-then-train with the newest weights, i.e. a lag of exactly 0."""
    return 0 if mode == "sync" else lag


__all__ = ["LagRuntime", "runtime_lag"]
