"""bf16 linear layers on the CPU with their weights reordered once into oneDNN's blocked layout.

A plain bf16 `F.linear` on the CPU hands oneDNN a row-major weight, which it reorders into its blocked (AMX /
avx512_bf16) layout on every call; at decode shapes (a few dozen rows) that reorder costs about as much as the
multiplication. `torch.ops.mkldnn._reorder_linear_weight` does it once and `_linear_pointwise` multiplies with
the result: the same kernel, the same outputs for contiguous inputs (within a bf16 ulp for strided ones, as
`F.linear` itself differs between the two), and SmolLM2-135M generated 1.5x the tokens/s (see
docs/performance.md). float32 gains little from packing and is left alone.

The packed copies are the engine's, kept beside the model's weights (one more bf16 copy of each linear layer)
and made again whenever a weight changes: a new tensor or an in-place write (`load_state_dict`, an optimiser
step) changes its (data_ptr, version) key. The model itself is changed only while `active()` is entered, and
then only on the engine's thread and only with gradients off; otherwise each layer runs its own forward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def weight_key(weight: torch.Tensor) -> tuple[int, int] | None:
    """What changes when the weight does; None where that is unknown (inference tensors have no version)."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:
        return None


class PackedLinears:
    """The bf16 CPU `nn.Linear` layers of one model, multiplied with packed weights while `active()`."""

    def __init__(self, model: nn.Module, rows_hint: int):
        self.rows_hint = rows_hint  # oneDNN picks its blocking for this many rows; any count works
        self.layers: list[nn.Linear] = []
        if available():
            self.layers = [
                m
                for m in model.modules()
                if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
            ]
        self.packed: dict[nn.Linear, tuple[tuple[int, int], torch.Tensor]] = {}
        self.owner: int | None = None  # the thread the packed forwards serve
        self.depth = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Route the layers through their packed weights on this thread for the duration; re-entrant. Another
        thread that enters while one is active runs the plain forwards (it waits for nothing)."""
        with self.lock:
            mine = self.owner is None or self.owner == threading.get_ident()
            if mine:
                if self.depth == 0:
                    self.owner = threading.get_ident()
                    for layer in self.layers:
                        layer.forward = self._forward_of(layer)
                self.depth += 1
        try:
            yield
        finally:
            if mine:
                with self.lock:
                    self.depth -= 1
                    if self.depth == 0:
                        for layer in self.layers:
                            layer.__dict__.pop("forward", None)
                        self.owner = None

    def _forward_of(self, layer: nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.linear(layer, x)

        return forward

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        weight = layer.weight
        if (
            torch.is_grad_enabled()
            or threading.get_ident() != self.owner
            or weight.dtype != torch.bfloat16  # the model was cast or moved since the engine was made
            or not weight.is_cpu
            or x.dtype != weight.dtype
            or x.device != weight.device
        ):
            return F.linear(x, weight, layer.bias)
        key = weight_key(weight)
        if key is None:
            return F.linear(x, weight, layer.bias)
        entry = self.packed.get(layer)
        if entry is None or entry[0] != key:
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight, self.rows_hint))
            self.packed[layer] = entry
        return torch.ops.mkldnn._linear_pointwise(x, entry[1], layer.bias, "none", [], "")
