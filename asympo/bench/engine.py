"""Rollout throughput: asympo's continuous-batching engine vs transformers `model.generate`, same RL workload.

The workload is RL-shaped: many prompts, `n` samples per prompt (consecutive, as a group), temperature 1,
responses of varied length. `generate` is called the way an RL framework calls it: the flat list of prompts
in batches of `batch`, left-padded, each batch running until its longest response ends. The engine gets the
same prompts with `max_batch = batch` slots. Both sample from the same distribution (same banned tokens, no
top-k). Effective tokens count what an RL step can use: each response up to and including its EOS. Both run
in one process, one after the other, so machine noise hits both alike; the ratio is the figure to read.
"""

from __future__ import annotations

import random
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.config import SamplingConfig
from asympo.rollout.hf import HFEngine


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
    model: PreTrainedModel, engine: HFEngine, prompts: list[list[int]], sampling: SamplingConfig, batch: int
) -> tuple[list[list[int]], int]:
    """`model.generate` on consecutive batches; returns responses (cut after EOS) and tokens computed."""
    pad, eos = engine.tokenizer.pad_token_id, engine.eos_id
    responses, computed = [], 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=engine.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=engine.device)
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


def engine_vs_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: int,
    n: int,
    batch: int,
    max_new_tokens: int,
    seed: int = 0,
    say=print,
) -> dict[str, float]:
    """Both decoders on the same prompts; returns each one's effective tokens/s and their ratio."""
    model.eval()
    engine = HFEngine(model, tokenizer, max_batch=batch)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    distinct = make_prompts(tokenizer, prompts, seed)
    flat = [p for p in distinct for _ in range(n)]
    say(
        f"engine vs generate: {len(distinct)} prompts x {n} samples, prompt length "
        f"{min(map(len, distinct))}-{max(map(len, distinct))}, max_new_tokens {max_new_tokens}, batch {batch}"
    )
    engine.generate_ids(flat[:4], sampling, torch.Generator().manual_seed(0))  # warm-up

    start = time.perf_counter()
    ours, _, _ = engine.generate_ids(flat, sampling, torch.Generator().manual_seed(seed))
    ours_time = time.perf_counter() - start
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        theirs, computed = run_generate(model, engine, flat, sampling, batch)
    theirs_time = time.perf_counter() - start

    rates = {}
    for name, responses, seconds in (("engine", ours, ours_time), ("generate", theirs, theirs_time)):
        useful = useful_tokens(responses, engine.eos_id)
        lengths = sorted(len(r) for r in responses)
        stopped = sum(engine.eos_id in r for r in responses) / len(responses)
        rates[name] = useful / seconds
        say(
            f"  {name:9s} {seconds:7.1f} s  {useful:6d} useful tokens  {useful / seconds:7.1f} tok/s "
            f"(length median {lengths[len(lengths) // 2]}, max {lengths[-1]}, {stopped:.0%} ended by EOS)"
        )
    rates["generate_computed"] = computed / theirs_time
    rates["ratio"] = rates["engine"] / rates["generate"]
    return rates
