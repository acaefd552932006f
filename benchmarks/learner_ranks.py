"""The data-parallel learner's cost on one machine: a learner step on 1 process against 2 FSDP ranks.

On one 2-core machine 2 ranks cannot be faster than 1 process with 2 threads: they split the same cores and
add the collectives (parameter all-gathers in forward and backward, gradient reduce-scatters, the metric
gather). This prints how much they add. 1 process runs before and after the 2 ranks, so drift in machine
load shows as a gap between its two figures; 1 process with 1 thread is the per-core reference (on a loaded
machine two threads of one process wait on each other, and that row shows it).

    .venv/bin/python benchmarks/learner_ranks.py [model=tiny|smollm2] [rows=32] [length=64] [repeats=5]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from asympo.batch import synthetic_batch
from asympo.bench.precision import cpu_description
from asympo.config import ObjectiveConfig, OptimConfig
from asympo.learner import Learner
from asympo.models.load import load_policy


def step_times(learner: Learner, batch, repeats: int) -> list[float]:
    """Seconds per step; one step first warms up (allocator, AdamW state) and is not counted."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        learner.step(batch)
        if i:
            times.append(time.perf_counter() - start)
    return times


def one_process(model_name: str, rows: int, length: int, repeats: int, threads: int = 2) -> list[float]:
    torch.set_num_threads(threads)
    model, tokenizer = load_policy(model_name)
    batch = synthetic_batch(len(tokenizer), rows, length)
    optim = OptimConfig(micro_batch_size=rows, warmup_steps=0)
    return step_times(Learner(model, ObjectiveConfig(), optim), batch, repeats)


def rank_main(model_name: str, rows: int, length: int, repeats: int) -> None:
    """Under torchrun: rank 0 times the steps and prints them as JSON; the other ranks follow."""
    from asympo.distributed import group
    from asympo.distributed.learner import ShardedLearner
    from asympo.models.device import CPU_FP32

    group.start(torch.device("cpu"))
    try:
        model, tokenizer = load_policy(model_name)
        batch = synthetic_batch(len(tokenizer), rows, length)
        optim = OptimConfig(micro_batch_size=rows, warmup_steps=0)
        learner = ShardedLearner(model, ObjectiveConfig(), optim, placement=CPU_FP32)
        if group.rank() == 0:
            print(json.dumps(step_times(learner, batch, repeats)))
            learner.release()
        else:
            learner.follow()
    finally:
        group.stop()


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    model, rows = opts.get("model", "tiny"), int(opts.get("rows", 32))
    length, repeats = int(opts.get("length", 64)), int(opts.get("repeats", 5))
    if "rank" in argv:
        rank_main(model, rows, length, repeats)
        return
    first = one_process(model, rows, length, repeats)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *argv, "rank"], capture_output=True, text=True, env=env, check=True)
    ranks = json.loads(done.stdout.strip().splitlines()[-1])
    second = one_process(model, rows, length, repeats)
    one_thread = one_process(model, rows, length, repeats, threads=1)
    single = statistics.median(first + second)
    print(f"CPU: {cpu_description()}; {os.cpu_count()} cores")
    print(f"{model}, {rows} x {length} tokens, median of {repeats} steps each")
    print("| learner | step s | vs 1 process |")
    print("|---|---|---|")
    print(
        f"| 1 process, 2 threads (before, after) | {statistics.median(first):.3f}, "
        f"{statistics.median(second):.3f} | 1.00x |"
    )
    print(
        f"| 1 process, 1 thread | {statistics.median(one_thread):.3f} | "
        f"{statistics.median(one_thread) / single:.2f}x |"
    )
    print(
        f"| 2 FSDP ranks (gloo), 1 thread each | {statistics.median(ranks):.3f} | "
        f"{statistics.median(ranks) / single:.2f}x |"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
