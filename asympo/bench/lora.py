"""LoRA vs full fine-tuning: the memory a learner step adds on top of the loaded model, at the first step
and at its peak over `steps` (from the second on, full fine-tuning holds AdamW's moments as well).

Each variant runs in a fresh process, spawned one after the other. On the CPU the figure is the process's
resident-set high-water mark (VmHWM, reset once the model is loaded: loading peaks above what stays)
minus its resident set at that point (VmRSS): torch's tensors
are allocated by malloc, which tracemalloc does not see, and the high-water mark counts every page touched,
gradients, AdamW's moments and activations alike. A fresh process per variant keeps memory the first one
freed (kept by the allocator, not returned to the system) from hiding the second one's peak. The weights
are read once before the baseline: a safetensors file is mapped, and its pages are resident only once touched
(SmolLM2's 513 MiB came into the first step's figure before). On CUDA it is
torch's peak allocated bytes over the step, from the same baseline.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from pathlib import Path

import torch

from asympo.batch import synthetic_batch
from asympo.config import LoraConfig, ObjectiveConfig, OptimConfig
from asympo.heap import keep_freed_memory
from asympo.learner import Learner
from asympo.lifetime import exit_with_parent
from asympo.models.device import resolve
from asympo.models.load import load_policy


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1])


def _steps(
    model_name: str, rank: int, rows: int, length: int, device: str, precision: str, threads: int, steps: int
):
    """In the child: load, then `steps` learner steps (LoRA when rank > 0); the bytes added at the peak of
    the first step and of all of them."""
    import peft  # noqa: F401 - before the baseline, in both variants: its modules are no part of a step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = load_policy(model_name)
    placement = resolve(device, precision, model)
    batch = synthetic_batch(len(tokenizer), rows, length)
    cuda = placement.device.type == "cuda"
    if cuda:
        model.to(placement.device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:  # loading may have peaked above what stays: reset the high-water mark to the resident set
        with torch.no_grad():  # weights may be mapped from the file lazily: page them all in first, or
            for p in model.parameters():  # the first step's reads would count them as its own memory
                p.sum()
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS") * 1024
    lora = LoraConfig(rank=rank) if rank else None
    learner = Learner(
        model, ObjectiveConfig(), OptimConfig(micro_batch_size=rows), placement=placement, lora=lora
    )
    peaks = []
    for _ in range(steps):
        learner.step(batch)
        peaks.append((torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - base)
    trainable = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
    return {"step_bytes": peaks[0], "run_bytes": peaks[-1], "trainable": trainable}


def _run(args: tuple, out: mp.Queue) -> None:
    exit_with_parent()
    keep_freed_memory()  # as in a training run (asympo.cli): the heap's reuse decides the peak
    out.put(_steps(*args))


def lora_memory(
    model_name: str,
    rows: int,
    length: int,
    rank: int = 16,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int = 2,
    steps: int = 3,
    say=print,
) -> dict:
    """A learner step's added memory, full fine-tuning vs LoRA of `rank`, each in its own process."""
    ctx = mp.get_context("spawn")
    r = {}
    for name, r_ in (("full", 0), ("lora", rank)):
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_run, args=((model_name, r_, rows, length, device, precision, threads, steps), queue)
        )
        proc.start()
        r[name] = queue.get()
        proc.join()
    r["rank"], r["steps"] = rank, steps
    r["ratio"] = r["lora"]["step_bytes"] / max(r["full"]["step_bytes"], 1)
    r["run_ratio"] = r["lora"]["run_bytes"] / max(r["full"]["run_bytes"], 1)
    mib = {k: {m: r[k][m] / 2**20 for m in ("step_bytes", "run_bytes")} for k in ("full", "lora")}
    say(
        f"lora: {rows} x {length} tokens, the first step adds {mib['full']['step_bytes']:.0f} MiB full, "
        f"{mib['lora']['step_bytes']:.0f} MiB with rank-{rank} LoRA ({r['ratio']:.2f}x); over {steps} steps "
        f"{mib['full']['run_bytes']:.0f} and {mib['lora']['run_bytes']:.0f} MiB ({r['run_ratio']:.2f}x); "
        f"{r['lora']['trainable']:,} of {r['full']['trainable']:,} parameters trained"
    )
    return r
