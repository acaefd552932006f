"""LoRA vs full fine-tuning: the memory one learner step adds on top of the loaded model.

Each variant runs in a fresh process, spawned one after the other. On the CPU the figure is the process's
resident-set high-water mark (VmHWM, reset once the model is loaded: loading peaks above what stays)
minus its resident set at that point (VmRSS): torch's tensors
are allocated by malloc, which tracemalloc does not see, and the high-water mark counts every page touched,
gradients, AdamW's moments and activations alike. A fresh process per variant keeps memory the first one
freed (kept by the allocator, not returned to the system) from hiding the second one's peak. On CUDA it is
torch's peak allocated bytes over the step, from the same baseline.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from pathlib import Path

import torch

from asympo.batch import synthetic_batch
from asympo.config import LoraConfig, ObjectiveConfig, OptimConfig
from asympo.learner import Learner
from asympo.lifetime import exit_with_parent
from asympo.models.device import resolve
from asympo.models.load import load_policy


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1])


def _one_step(model_name: str, rank: int, rows: int, length: int, device: str, precision: str, threads: int):
    """In the child: load, then one learner step (LoRA when rank > 0); the bytes it added at its peak."""
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
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS") * 1024
    lora = LoraConfig(rank=rank) if rank else None
    learner = Learner(
        model, ObjectiveConfig(), OptimConfig(micro_batch_size=rows), placement=placement, lora=lora
    )
    learner.step(batch)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    trainable = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
    return {"step_bytes": peak - base, "trainable": trainable}


def _run(args: tuple, out: mp.Queue) -> None:
    exit_with_parent()
    out.put(_one_step(*args))


def lora_memory(
    model_name: str,
    rows: int,
    length: int,
    rank: int = 16,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int = 2,
    say=print,
) -> dict:
    """One learner step's added memory, full fine-tuning vs LoRA of `rank`, each in its own process."""
    ctx = mp.get_context("spawn")
    r = {}
    for name, r_ in (("full", 0), ("lora", rank)):
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_run, args=((model_name, r_, rows, length, device, precision, threads), queue)
        )
        proc.start()
        r[name] = queue.get()
        proc.join()
    r["rank"], r["ratio"] = rank, r["lora"]["step_bytes"] / max(r["full"]["step_bytes"], 1)
    say(
        f"lora: {rows} x {length} tokens, one step adds {r['full']['step_bytes'] / 2**20:.0f} MiB full, "
        f"{r['lora']['step_bytes'] / 2**20:.0f} MiB with rank-{rank} LoRA "
        f"({r['lora']['trainable']:,} of {r['full']['trainable']:,} parameters trained)"
    )
    return r
