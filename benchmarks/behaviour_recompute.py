"""Cost of learner-side behaviour log-probs: a `grpo` step with recompute vs an `asympo` step, same batch.

Run: .venv/bin/python benchmarks/behaviour_recompute.py [--repeats 10]
Timings alternate between the two in one run, so machine noise hits both alike; medians are compared.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from asympo.batch import make_batch
from asympo.config import ObjectiveConfig, OptimConfig, RolloutConfig, TaskConfig
from asympo.data.tasks import train_stream
from asympo.learner import Learner
from asympo.models.load import load_policy
from asympo.recompute import BehaviourRecompute
from asympo.rewards.exact import exact_match
from asympo.rollout.hf import HFEngine
from asympo.snapshots import SnapshotStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--lag", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = load_policy("tiny")
    rollout = RolloutConfig(prompts_per_step=args.prompts)
    stream = train_stream(TaskConfig(), seed=0)
    problems = [next(stream) for _ in range(args.prompts)]
    groups = HFEngine(copy.deepcopy(model), tokenizer, return_logprobs=False).generate(
        [p.prompt for p in problems], rollout.group_size, rollout, torch.Generator().manual_seed(0)
    )
    samples = []
    for gid, (problem, group) in enumerate(zip(problems, groups, strict=True)):
        for s in group:
            s.group, s.reward = gid, exact_match(s.text, problem.answer)
            samples.append(s)

    asympo = Learner(copy.deepcopy(model), ObjectiveConfig(name="asympo"), OptimConfig())
    grpo = Learner(copy.deepcopy(model), ObjectiveConfig(name="grpo"), OptimConfig())
    store = SnapshotStore(args.lag + 1)
    for version in range(args.lag + 1):  # the batch is lag versions old, as in the lag runtime
        store.put(version, grpo.weights())
    recompute = BehaviourRecompute(copy.deepcopy(model), store, tokenizer.pad_token_id)

    times: dict[str, list[float]] = {"asympo step": [], "grpo step + recompute": [], "recompute only": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        asympo.step(make_batch(samples, tokenizer.pad_token_id, "group_norm"))
        times["asympo step"].append(time.perf_counter() - start)
        recompute.loaded_version = None  # force the snapshot swap a real step pays when the version moves
        start = time.perf_counter()
        scored, _ = recompute.apply([copy.copy(s) for s in samples])
        middle = time.perf_counter()
        grpo.step(make_batch(scored, tokenizer.pad_token_id, "group_norm"))
        times["grpo step + recompute"].append(time.perf_counter() - start)
        times["recompute only"].append(middle - start)
    base = statistics.median(times["asympo step"])
    threads = torch.get_num_threads()
    print(f"{len(samples)} responses, lag {args.lag}, {args.repeats} repeats, torch threads {threads}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:24s} median {median * 1e3:7.1f} ms   ratio to asympo {median / base:.2f}")


if __name__ == "__main__":
    main()
