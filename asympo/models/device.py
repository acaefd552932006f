"""Where a model runs and in which precision: `device` (auto, cpu, cuda, cuda:N) and `precision` (auto, fp32,
bf16), resolved once into a `Placement` that the learner and the engines share.

bf16 here means: the learner keeps float32 master weights and AdamW state and computes its forward and
backward under `torch.autocast(bfloat16)` (log-softmax and the loss stay float32); an engine keeps its own
bf16 copy of the weights, so its KV cache is bf16 too. `auto` picks bf16 where the hardware runs it fast:
a CUDA device with bf16 support, or a CPU whose bf16 matmul, measured now at the model's own width, beats
float32 by `CPU_BF16_MARGIN` (CPUs with AMX do; AVX2-only CPUs emulate bf16 and do not), for a model big
enough that matmuls bound its step (`CPU_BF16_MIN_PARAMS`: the 1M-parameter tiny model's step is bound by
elementwise work and Python overhead, and measured the same, 0.15 s, in bf16 and float32 on an AMX CPU).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass
from typing import Literal

import torch

from asympo.config import Precision, check_device_name
from asympo.errors import UserError
from asympo.models.lora import strip_into

CPU_BF16_MARGIN = 2.0  # bf16 must beat float32 matmuls by this factor on a CPU before auto picks it
CPU_BF16_MIN_PARAMS = 20_000_000  # and the model must be at least this big
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for a CUDA device that is not there: a UserError."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = (
                "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            )
            raise UserError(f"device={name} asked for, but {built}: use device=cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device={name} asked for, but this machine has {count} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _best_rate(dtype: torch.dtype, rows: int, width: int, repeats: int) -> float:
    a = torch.randn(rows, width, dtype=dtype)
    b = torch.randn(width, 4 * width, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel selection, AMX tile configuration
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * width * 4 * width / best


@functools.cache
def cpu_bf16_speedup(width: int = 1024, rows: int = 1024, repeats: int = 5) -> float:
    """bf16 over float32 matmul throughput on this CPU, at a layer's shape ([rows, width] x [width, 4 width],
    an MLP's up projection). Takes tens of milliseconds; cached per shape."""
    return _best_rate(torch.bfloat16, rows, width, repeats) / _best_rate(torch.float32, rows, width, repeats)


def resolve_precision(
    name: Precision, device: torch.device, width: int | None = None, params: int | None = None
) -> tuple[str, str]:
    """(`fp32` or `bf16`, why). `width` (the model's hidden size) shapes the CPU measurement; `params` (its
    parameter count) decides whether matmuls matter at all."""
    if name not in ("auto", "fp32", "bf16"):
        raise UserError(f"precision must be auto, fp32 or bf16 (got '{name}')")
    if name != "auto":
        return name, "asked for"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] >= 8:  # Ampere and newer run bf16 natively
            return "bf16", f"{torch.cuda.get_device_name(device)} runs bf16"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no bf16"
    if device.type != "cpu":
        return "fp32", f"no bf16 rule for device type {device.type}"
    if params is not None and params < CPU_BF16_MIN_PARAMS:
        return "fp32", f"{params / 1e6:.1f}M parameters: too small for bf16 to pay on a CPU"
    width = max(64, min(width or 1024, 4096))
    speedup = cpu_bf16_speedup(width)
    choice = "bf16" if speedup >= CPU_BF16_MARGIN else "fp32"
    return (
        choice,
        f"bf16 matmuls at width {width} ran {speedup:.1f}x float32 here (bf16 from {CPU_BF16_MARGIN}x)",
    )


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision. `bf16` turns on autocast for the learner and bf16 engine weights."""

    device: torch.device
    precision: Literal["fp32", "bf16"]
    reason: str = ""

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype an engine keeps its weights (and KV cache) in."""
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 compute with float32 weights; a no-op in fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def describe(self) -> str:
        return f"{self.device} {self.precision}" + (f" ({self.reason})" if self.reason else "")


CPU_FP32 = Placement(torch.device("cpu"), "fp32", "default")


def resolve(device: str, precision: Precision, model: torch.nn.Module | None = None) -> Placement:
    """The placement for `device` and `precision`; `model` (its width and size) informs auto on a CPU."""
    where = resolve_device(device)
    width = params = None
    if model is not None:
        width = getattr(getattr(model, "config", None), "hidden_size", None)
        params = sum(p.numel() for p in model.parameters())
    chosen, why = resolve_precision(precision, where, width, params)
    return Placement(where, chosen, why)


def for_engine(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Move an engine's own copy of the policy to the device, in the engine's dtype (bf16 or float32).

    Buffers outside the state dict (rotary inverse frequencies) keep their dtype: in bf16 they would lose
    digits that every position's angle is built from, which `from_pretrained(dtype=bf16)` also avoids."""
    persistent = set(model.state_dict())
    kept = {
        name: buf for name, buf in model.named_buffers() if name not in persistent and buf.is_floating_point()
    }
    model.to(device=placement.device, dtype=placement.dtype)
    for name, buf in kept.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = buf.to(placement.device)
    return model


def engine_copy(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """An engine's own copy of `model` on the placement's device and dtype, made without a transient float32
    copy (4 B/param more on a GPU for a moment: 6.4 GiB for a 1.7B model): deepcopy is handed each parameter
    and state-dict buffer already cast, through its memo, and copies only the module structure around them."""
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, object] = {}
    for tensor in model.parameters():
        if id(tensor) not in memo:  # a tied weight is cast once and stays tied
            dtype = placement.dtype if tensor.is_floating_point() else None
            cast = tensor.detach().to(placement.device, dtype=dtype, copy=True)
            memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False)
    for tensor in model.buffers():
        floating = tensor.is_floating_point() and id(tensor) in persistent  # rotary frequencies keep float32
        dtype = placement.dtype if floating else None
        memo.setdefault(id(tensor), tensor.to(placement.device, dtype=dtype, copy=True))
    if hasattr(model, "peft_config"):  # LoRA: the plain architecture holding the merged weights
        return strip_into(copy.deepcopy(getattr(model, "get_base_model", lambda: model)(), memo), model)
    return copy.deepcopy(model, memo)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on the CPU, where the operating system decides)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free
