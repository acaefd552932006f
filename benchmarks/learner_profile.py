"""Where a learner step's time goes: a `torch.profiler` table of one steady-state step (after warm-up steps,
so the kept heap has no page faults left), with the ops gathered into the groups docs/performance.md reports.

Run: .venv/bin/python benchmarks/learner_profile.py [--model smollm2] [--precision bf16] [--sdpa math]
It prints the CPU first: bf16's share depends on it (AMX, avx512_bf16 or neither).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from asympo.batch import synthetic_batch
from asympo.bench.precision import cpu_description
from asympo.config import ObjectiveConfig, OptimConfig
from asympo.heap import keep_freed_memory
from asympo.learner import Learner
from asympo.models.device import resolve
from asympo.models.load import load_policy

# op name prefixes -> group; an op is counted by its self time, so nested ops are not counted twice
GROUPS = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int", "mkldnn")),
    ("attention", ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("optimizer", ("aten::_fused_adamw", "Optimizer", "aten::_foreach")),
    ("softmax and exp (head)", ("aten::exp", "aten::_softmax", "aten::_log_softmax", "aten::logsumexp")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow",
                     "aten::rsqrt", "aten::neg", "aten::mean", "aten::sum", "aten::cat", "aten::where",
                     "aten::masked", "aten::fill_", "aten::zero_", "aten::sigmoid", "aten::cos",
                     "aten::sin")),
)  # fmt: skip


def group_of(name: str) -> str:
    for group, prefixes in GROUPS:
        if name.startswith(prefixes):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--sdpa", default="default", choices=("default", "math"), help="attention kernel")
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, tokenizer = load_policy(args.model)
    placement = resolve("cpu", args.precision, model)
    learner = Learner(model, ObjectiveConfig(), OptimConfig(micro_batch_size=args.rows), placement=placement)
    batch = synthetic_batch(len(tokenizer), args.rows, args.length)
    kernel = sdpa_kernel(SDPBackend.MATH) if args.sdpa == "math" else contextlib.nullcontext()
    with kernel:
        for _ in range(args.warmup):
            learner.step(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            learner.step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    shape = f"{args.model}, {args.precision}, {args.rows} x {args.length} tokens, attention {args.sdpa}"
    print(f"\n{shape}: one step, {total / 1e6:.2f} s of op time")
    print("| group | seconds | share |\n|---|---|---|")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {us / 1e6:.2f} | {us / total:.0%} |")
    print("\n| op | seconds | calls |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.3f} | {e.count} |")


if __name__ == "__main__":
    main()
