"""The training-inference mismatch in bf16: how far an engine's behaviour log-probs sit from the learner's.

grpo-style objectives take the ratio pi_learner / pi_engine per token; with both in float32 it is 1 to ~1e-5,
in bf16 it is not, which is what truncated-importance-sampling corrections exist for. This samples responses
from engines in float32 and in bf16 (bf16 weights and KV cache) and scores the same tokens with the learner in
float32 and under bf16 autocast, then prints the per-token |log-prob difference| and |1 - ratio|.

    .venv/bin/python benchmarks/precision_numerics.py model=smollm2 prompts=16 n=4 max_new_tokens=64
"""

from __future__ import annotations

import json
import sys

import torch

from asympo.batch import make_batch
from asympo.bench.engine import make_prompts
from asympo.bench.precision import cpu_description
from asympo.config import SamplingConfig
from asympo.logprobs import token_logprobs
from asympo.models.device import Placement, engine_copy
from asympo.models.load import load_policy
from asympo.rollout.hf import HFEngine


def sample(model, tokenizer, precision: str, prompts: list[list[int]], n: int, max_new: int):
    """Responses and their behaviour log-probs from an engine holding the policy in `precision`."""
    engine = HFEngine(engine_copy(model, Placement(torch.device("cpu"), precision)), tokenizer)
    flat = [p for p in prompts for _ in range(n)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new)
    responses, logprobs, _ = engine.generate_ids(flat, sampling, torch.Generator().manual_seed(0))
    return flat, responses, logprobs


def mismatch(model, tokenizer, flat, responses, behaviour, learner_precision: str) -> dict[str, float]:
    from asympo.rollout.base import Sample

    samples = [
        Sample("", list(p), r, "", "length", 0, b) for p, r, b in zip(flat, responses, behaviour, strict=True)
    ]
    batch = make_batch(samples, tokenizer.pad_token_id, "mean")
    with torch.no_grad(), Placement(torch.device("cpu"), learner_precision).autocast():
        learner = token_logprobs(model, batch.input_ids, batch.attention_mask, 1.0, batch.response_mask)
    mask = batch.response_mask
    diff = learner[mask] - batch.behaviour_logprobs[mask]
    return {
        "lp_diff_mean": diff.abs().mean().item(),
        "lp_diff_p99": diff.abs().quantile(0.99).item(),
        "lp_diff_max": diff.abs().max().item(),
        "ratio_dev_mean": (diff.exp() - 1).abs().mean().item(),
        "tokens": int(mask.sum()),
    }


def main(argv: list[str]) -> None:
    opts = {"model": "tiny", "prompts": "16", "n": "4", "max_new_tokens": "32", "threads": "2"}
    opts |= dict(a.split("=", 1) for a in argv)
    torch.set_num_threads(int(opts["threads"]))
    model, tokenizer = load_policy(opts["model"])
    prompts = make_prompts(tokenizer, int(opts["prompts"]), 0)
    print(f"{opts['model']} on {cpu_description()}")
    results = {}
    for engine_precision in ("fp32", "bf16"):
        flat, responses, behaviour = sample(
            model, tokenizer, engine_precision, prompts, int(opts["n"]), int(opts["max_new_tokens"])
        )
        for learner_precision in ("fp32", "bf16"):
            r = mismatch(model, tokenizer, flat, responses, behaviour, learner_precision)
            results[f"engine {engine_precision} / learner {learner_precision}"] = r
            print(
                f"engine {engine_precision} vs learner {learner_precision}: "
                f"|diff| mean {r['lp_diff_mean']:.4f}, p99 {r['lp_diff_p99']:.4f}, "
                f"max {r['lp_diff_max']:.4f}; |1 - ratio| mean {r['ratio_dev_mean']:.4f}"
                f" ({r['tokens']} tokens)"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
