"""Throughput of the `async` runtime against `sync`: the same model, batch shape and number of steps.

Run: .venv/bin/python benchmarks/async_vs_sync.py [--steps 40] [--repeats 2]
Each run is a fresh `asympo train` process (so thread settings never leak between them); sync and async
alternate, so drift in machine load hits both alike. Samples/s counts trained samples over the steady
state (from the end of the first step to the end of the last), so start-up and evaluation are excluded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(mode: str, steps: int, out: Path, extra: list[str]) -> dict:
    args = [f"runtime.mode={mode}", f"steps={steps}", f"out={out}", "eval_every=0", "eval_samples=1"]
    args += ["task.test_size=20", "progress=false", "save_model=false", "checkpoint_every=0", *extra]
    subprocess.run([sys.executable, "-m", "asympo", "train", *args], check=True, capture_output=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "reward" in m]
    rollout = json.loads((out / "config.json").read_text())["rollout"]
    samples = (len(trained) - 1) * rollout["prompts_per_step"] * rollout["group_size"]
    seconds = trained[-1]["elapsed"] - trained[0]["elapsed"]
    staleness = [m["staleness_mean"] for m in trained]
    return {
        "samples_per_s": samples / seconds,
        "staleness_mean": statistics.fmean(staleness),
        "staleness_max": max(int(k) for m in trained for k in m["staleness_hist"]),
        "worker_busy": statistics.fmean(m.get("worker_busy", float("nan")) for m in trained[1:]),
        "learner_busy": statistics.fmean(m.get("learner_busy", float("nan")) for m in trained[1:]),
        "dropped_stale": trained[-1].get("dropped_stale", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra key=value for both runs")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in results:
                result = run(mode, args.steps, Path(tmp) / f"{mode}-{r}", args.overrides)
                results[mode].append(result)
                print(f"{mode:5s} run {r}: {result['samples_per_s']:.0f} samples/s", file=sys.stderr)
    rate = {mode: statistics.median(r["samples_per_s"] for r in runs) for mode, runs in results.items()}
    last = results["async"][-1]
    print("| runtime | samples/s (median) | staleness mean / max | worker busy | learner busy |")
    print("|---|---|---|---|---|")
    print(f"| sync | {rate['sync']:.0f} | 0 / 0 | - | - |")
    print(
        f"| async | {rate['async']:.0f} | {last['staleness_mean']:.2f} / {last['staleness_max']} "
        f"| {last['worker_busy']:.0%} | {last['learner_busy']:.0%} |"
    )
    print(f"\nasync / sync = {rate['async'] / rate['sync']:.2f}x  (target >= 1.4x)")


if __name__ == "__main__":
    main()
