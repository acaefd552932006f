"""`asympo bench`: the performance ratios, each measured side by side in one run (asympo.bench.suite)."""

from __future__ import annotations

from asympo.bench.suite import run_bench
from asympo.config import BenchConfig


def run(cfg: BenchConfig) -> dict:
    return run_bench(cfg)
