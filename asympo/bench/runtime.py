"""Throughput of the runtimes: the same model, batch shape and number of steps in `sync` and `async`.

Each run is a fresh `asympo train` process (so thread settings never leak between them); the variants
alternate, so drift in machine load hits all alike. Samples/s counts trained samples over the steady state
(from the end of the first step to the end of the last), so start-up and evaluation are excluded.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

from asympo.errors import UserError
from asympo.lifetime import child_env

# name -> the overrides that select it; every variant trains the same model on the same batches
VARIANTS = {"sync": ["runtime.mode=sync"], "async": ["runtime.mode=async"]}
# when an async worker takes new weights: between jobs, or between decode steps (keeping or recomputing KV)
INFLIGHT_VARIANTS = {
    "between_jobs": ["runtime.mode=async", "rollout.weight_updates=between_jobs"],
    "keep": ["runtime.mode=async", "rollout.weight_updates=inflight", "rollout.inflight_kv=keep"],
    "recompute": ["runtime.mode=async", "rollout.weight_updates=inflight", "rollout.inflight_kv=recompute"],
}


def train_run(overrides: list[str], steps: int, out: Path, extra: list[str]) -> dict:
    args = [f"steps={steps}", f"out={out}", "eval_every=0", "eval_samples=1", "task.test_size=20"]
    args += ["progress=false", "save_model=false", "checkpoint_every=0", *overrides, *extra]
    command = [sys.executable, "-m", "asympo", "train", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench run {' '.join(overrides)} failed: {last}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "reward" in m]
    rollout = json.loads((out / "config.json").read_text())["rollout"]
    samples = (len(trained) - 1) * rollout["prompts_per_step"] * rollout["group_size"]
    seconds = trained[-1]["elapsed"] - trained[0]["elapsed"]
    steady = trained[1:]
    return {
        "samples_per_s": samples / seconds,
        "staleness_mean": statistics.fmean(m["staleness_mean"] for m in trained),
        "staleness_max": max(int(k) for m in trained for k in m["staleness_hist"]),
        "worker_busy": statistics.fmean(m.get("worker_busy", float("nan")) for m in trained[1:]),
        "learner_busy": statistics.fmean(m.get("learner_busy", float("nan")) for m in trained[1:]),
        "dropped_stale": trained[-1].get("dropped_stale", 0),
        # sync only: the split of a step, which bounds what overlapping generation and training can gain
        "rollout_s": statistics.fmean(m.get("rollout_time", float("nan")) for m in trained[1:]),
        "learn_s": statistics.fmean(m["learn_time"] for m in trained[1:]),
        # async only: rollout tokens/s while generating, publish-to-use latency, the staleness split
        "rollout_tokens_per_s": mean_of(steady, "rollout_tokens_per_s"),
        "publish_latency_p50": median_of(steady, "publish_latency_p50"),
        "publish_latency_p99": max_of(steady, "publish_latency_p99"),
        "staleness_inflight_mean": mean_of(trained, "staleness_inflight_mean"),
        "staleness_queue_mean": mean_of(trained, "staleness_queue_mean"),
        "spanning_frac": mean_of(trained, "spanning_frac"),
    }


def finite(rows: list[dict], key: str) -> list[float]:
    return [m[key] for m in rows if isinstance(m.get(key), int | float) and m[key] == m[key]]


def mean_of(rows: list[dict], key: str) -> float:
    values = finite(rows, key)
    return statistics.fmean(values) if values else float("nan")


def median_of(rows: list[dict], key: str) -> float:
    values = finite(rows, key)
    return statistics.median(values) if values else float("nan")


def max_of(rows: list[dict], key: str) -> float:
    values = finite(rows, key)
    return max(values) if values else float("nan")


def compare_runtimes(
    out: Path, steps: int, repeats: int, variants: dict[str, list[str]], extra: list[str] = (), say=print
) -> dict[str, dict]:
    """The median samples/s of each variant over `repeats` alternating runs, and the last run's details."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, overrides in variants.items():
            result = train_run(overrides, steps, out / f"{name}-{r}", list(extra))
            runs[name].append(result)
            say(f"  {name:8s} run {r}: {result['samples_per_s']:.4g} samples/s")
    return {
        name: results[-1] | {"samples_per_s": statistics.median(r["samples_per_s"] for r in results)}
        for name, results in runs.items()
    }


@contextmanager
def served_tiny(threads: int = 1) -> Iterator[str]:
    """`asympo serve` with the tiny model in its own process, for the OpenAI-engine variant: its URL."""
    args = [sys.executable, "-m", "asympo", "serve", "port=0", f"threads={threads}"]
    server = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env()
    )
    try:
        first = server.stdout.readline()  # "asympo serve: listening on http://127.0.0.1:PORT/v1 (...)"
        if "listening on " not in first:
            raise UserError(f"asympo serve did not start (exit {server.poll()})")
        yield first.split("listening on ", 1)[1].split()[0]
    finally:
        server.terminate()
        server.wait(timeout=30)


def backend_variants(url: str) -> dict[str, list[str]]:
    """The async runtime with each rollout backend: worker processes, Ray actors, an HTTP server."""
    variants = {"local": ["runtime.mode=async"]}
    if find_spec("ray") is not None:
        variants["ray"] = ["runtime.mode=async", "runtime.backend=ray", "runtime.ray_num_cpus=2"]
    variants["openai"] = ["runtime.mode=async", "rollout.engine=openai", f"rollout.openai.base_url={url}"]
    return variants
