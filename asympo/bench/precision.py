"""bf16 against float32 on one device, side by side: a learner step (float32 master weights, bf16 autocast)
and engine decode (bf16 weights and KV cache), each timed alternately in one process, with the learner's
FLOP/s against the matmul peak of the dtype it runs, measured in the same run.

What the ratios mean depends on the processor, so the CPU's model and the flags that decide bf16 speed (AMX,
avx512_bf16) are printed with them: with AMX bf16 matmuls run several times float32; with AVX2 alone torch
emulates bf16 and it is slower.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.batch import synthetic_batch
from asympo.bench.engine import make_prompts, useful_tokens
from asympo.bench.learner import alternate_steps, matmul_peak, step_flops
from asympo.config import ObjectiveConfig, OptimConfig, SamplingConfig
from asympo.learner import Learner
from asympo.models.device import Placement, engine_copy
from asympo.rollout.hf import HFEngine

BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    """The CPU's model name and which of the bf16-relevant instruction sets it has (Linux: /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    present = [f for f in BF16_FLAGS if f in flags]
    return f"{model}; flags: {' '.join(present) or 'none of ' + ' '.join(BF16_FLAGS)}"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return cpu_description()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learner_precisions(
    model: PreTrainedModel,
    vocab: int,
    device: torch.device,
    rows: int,
    length: int,
    repeats: int,
    peak_sizes: tuple[int, ...] = (1024, 2048),
    say=print,
) -> dict:
    """Median `asympo` step time in float32 and in bf16 on one batch, alternating rounds (round 0 warms up),
    and each one's FLOP/s against its own dtype's matmul peak."""
    batch = synthetic_batch(vocab, rows, length)
    optim = OptimConfig(micro_batch_size=rows, warmup_steps=0)
    learners = {
        precision: Learner(
            copy.deepcopy(model),
            ObjectiveConfig(name="asympo"),
            optim,
            placement=Placement(device, precision),
        )
        for precision in ("fp32", "bf16")
    }
    times = alternate_steps(learners, batch, repeats)
    del learners
    flops = step_flops(model, batch)
    out: dict = {"step_gflop": flops / 1e9}
    for precision in ("fp32", "bf16"):
        seconds = statistics.median(times[precision])
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peak, n = matmul_peak(peak_sizes, dtype=dtype, device=device)
        out[precision] = {
            "step_s": seconds,
            "gflops": flops / seconds / 1e9,
            "peak_gflops": peak / 1e9,
            "peak_n": n,
            "utilisation": flops / seconds / peak,
        }
    out["speedup"] = statistics.median(f / b for f, b in zip(times["fp32"], times["bf16"], strict=True))
    say(
        f"learner: {rows} x {length} tokens, float32 step {out['fp32']['step_s']:.2f} s, bf16 step "
        f"{out['bf16']['step_s']:.2f} s ({out['speedup']:.2f}x), {flops / 1e9:.1f} GFLOP per step"
    )
    return out


def decode_precisions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    prompts: int,
    n: int,
    batch: int,
    max_new_tokens: int,
    repeats: int,
    say=print,
) -> dict:
    """Useful tokens/s of the engine with float32 weights and with bf16 weights (and KV cache), same prompts
    and seeds, alternating."""
    engines = {
        p: HFEngine(engine_copy(model, Placement(device, p)), tokenizer, max_batch=batch)
        for p in ("fp32", "bf16")
    }
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens)
    flat = [p for p in make_prompts(tokenizer, prompts, 0) for _ in range(n)]
    rates: dict[str, list[float]] = {p: [] for p in engines}
    for round_ in range(repeats + 1):
        for precision, engine in engines.items():
            work = flat[:4] if round_ == 0 else flat  # round 0 warms up
            _sync(device)
            start = time.perf_counter()
            responses, _, _ = engine.generate_ids(work, sampling, torch.Generator().manual_seed(round_))
            _sync(device)
            if round_:
                rates[precision].append(
                    useful_tokens(responses, engine.eos_id) / (time.perf_counter() - start)
                )
    out = {p: statistics.median(r) for p, r in rates.items()}
    out["speedup"] = statistics.median(b / f for f, b in zip(rates["fp32"], rates["bf16"], strict=True))
    say(
        f"decode: {prompts} prompts x {n}, max_new_tokens {max_new_tokens}, batch {batch}: float32 "
        f"{out['fp32']:.1f} tok/s, bf16 {out['bf16']:.1f} tok/s ({out['speedup']:.2f}x)"
    )
    return out
