"""Where asympo's in-process engine (asympo.rollout.hf.HFEngine) spends a generation, and old vs new code.

    .venv/bin/python benchmarks/engine_profile.py [--dtype fp32|bf16|both] [--prompts 8] [--n 4]
        [--tokens 64] [--batch 32] [--threads 1] [--rounds 2] [--profile]

One RL-shaped generation (the prompts of asympo.bench.engine, `n` samples each, temperature 1, top_p 1) on
SmolLM2-135M, run by two engines on one model copy in alternating rounds, so that machine noise hits both:
`old` is the engine as of the 0.29x measurement (the sampler below, which takes a float32 log-softmax and a
float64 cumulative sum over the whole vocabulary, and bf16 linear layers that hand oneDNN an unpacked weight
on every call) and `new` is the engine as it is. Each round prints useful tokens/s and a breakdown of its
wall time: prefill and decode forwards, sampling, and the rest (the engine's Python loop and cache
bookkeeping). `--profile` adds, for each, a torch.profiler table of CPU time by operator. Both engines draw
the same uniforms from the same seed, so their tokens agree unless a kernel's rounding tips a draw.

libgomp (torch's OpenMP) spins while it waits; with more threads than idle cores a step can take 5x longer
(docs/performance.md), so on a shared machine run with `--threads 1` or `OMP_WAIT_POLICY=PASSIVE`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import time
from collections import defaultdict

import torch

from asympo.bench.engine import make_prompts, useful_tokens
from asympo.config import SamplingConfig
from asympo.models.device import Placement, engine_copy
from asympo.models.load import load_policy
from asympo.rollout import hf

GROUPS = {  # operator name prefix -> part of the step (first match wins)
    "matmul": ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm", "mkldnn::_linear"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product"),
}


def old_sample_tokens(logits, sampling, generator):
    """The sampler the 0.29x figure was measured with (top_p 1 path)."""
    logits = logits.float()
    if sampling.temperature == 0 or sampling.top_p < 1.0:
        raise NotImplementedError("the comparison runs temperature > 0, top_p 1")
    logprobs = torch.log_softmax(logits / sampling.temperature, -1)
    probs = logprobs.exp()
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, generator=generator).to(cdf.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line), "?")


class Timed:
    """Wall time of the engine's forwards (prefill / decode) and sampler calls."""

    def __init__(self, engine: hf.HFEngine, sampler):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sampler = sampler
        forward = engine.model.forward

        def timed_forward(*args, **kwargs):
            part = "decode" if kwargs["input_ids"].shape[1] == 1 else "prefill"
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            self.seconds[part] += time.perf_counter() - start
            return out

        self.forward = timed_forward

    def sample(self, *args):
        start = time.perf_counter()
        out = self.sampler(*args)
        self.seconds["sampling"] += time.perf_counter() - start
        return out


@contextlib.contextmanager
def variant(engine: hf.HFEngine, timed: Timed):
    """Route the engine's forwards and hf.sample_tokens through `timed` for one run."""
    original = hf.sample_tokens
    engine.model.forward = timed.forward
    hf.sample_tokens = timed.sample
    try:
        yield
    finally:
        hf.sample_tokens = original
        del engine.model.forward


def run(engine, timed, flat, sampling, seed):
    timed.seconds.clear()
    with variant(engine, timed):
        start = time.perf_counter()
        responses, logprobs, _ = engine.generate_ids(flat, sampling, torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - start
    return seconds, responses, logprobs


def profile(engine, timed, flat, sampling, seed) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, responses, _ = run(engine, timed, flat, sampling, seed)
    events = prof.key_averages()
    parts: dict[str, float] = defaultdict(float)
    for e in events:
        part = next((p for p, names in GROUPS.items() if e.key.startswith(names)), "other ops")
        parts[part] += e.self_cpu_time_total / 1e6
    covered = sum(parts.values())
    print(f"    profiled: {seconds:.2f} s wall (profiler on), op self time {covered:.2f} s:", end="")
    for part, secs in sorted(parts.items(), key=lambda x: -x[1]):
        print(f" {part} {secs / seconds:.0%}", end="")
    print(f", outside ops {(seconds - covered) / seconds:.0%}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"      {e.key:48s} {e.count:7d} calls {e.self_cpu_time_total / 1e6:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY {wait}")
    model, tokenizer = load_policy(args.model)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.tokens)
    distinct = make_prompts(tokenizer, args.prompts, 0)
    flat = [p for p in distinct for _ in range(args.n)]
    for precision in ("fp32", "bf16") if args.dtype == "both" else (args.dtype,):
        copy = engine_copy(model, Placement(torch.device("cpu"), precision))
        old, new = (hf.HFEngine(copy, tokenizer, max_batch=args.batch) for _ in range(2))
        old.packed.layers = []  # the plain bf16 linear layers
        engines = {"old": (old, Timed(old, old_sample_tokens)), "new": (new, Timed(new, hf.sample_tokens))}
        print(
            f"{precision}: {args.prompts} prompts x {args.n}, up to {args.tokens} tokens, "
            f"{args.batch} at once, load average {os.getloadavg()[0]:.1f}"
        )
        for engine, timed in engines.values():
            run(engine, timed, flat[:4], sampling, 0)  # warm-up
        rates: dict[str, list[float]] = defaultdict(list)
        for r in range(args.rounds):
            out = {}
            for name, (engine, timed) in engines.items():
                seconds, responses, logprobs = run(engine, timed, flat, sampling, r)
                out[name] = responses, logprobs
                useful = useful_tokens(responses, engine.eos_id)
                rates[name].append(useful / seconds)
                parts = " ".join(f"{k} {v / seconds:.0%}" for k, v in sorted(timed.seconds.items()))
                rest = 1 - sum(timed.seconds.values()) / seconds
                print(
                    f"  round {r + 1} {name}: {seconds:6.2f} s {useful:5d} useful tokens "
                    f"{useful / seconds:6.1f} tok/s | {parts} rest {rest:.0%}"
                )
            same = sum(a == b for a, b in zip(out["old"][0], out["new"][0], strict=True))
            print(f"  round {r + 1}: {same}/{len(flat)} responses token for token the same")
        best = {name: max(v) for name, v in rates.items()}
        print(f"  best: old {best['old']:.1f}, new {best['new']:.1f} tok/s: {best['new'] / best['old']:.2f}x")
        if args.profile:
            for name, (engine, timed) in engines.items():
                print(f"  {name}:")
                profile(engine, timed, flat, sampling, 0)


if __name__ == "__main__":
    main()
