"""A model's weights leaving it: published to rollout engines as a state dict, or saved as a folder."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.models.lora import merged_weights, save_pretrained
from asympo.models.tying import tied_aliases


def publishable_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A detached CPU copy to publish to rollout engines, in the engines' dtype (`dtype`: bf16 halves what
    each version costs to copy, keep and send). A tied alias (`lm_head.weight` sharing the embedding) is
    left out, as `save_pretrained` does: engines load it through their own tie, and each published version
    is one embedding smaller (113 MB for SmolLM2 in float32). A model with LoRA adapters gives its merged
    weights under the plain names (asympo.models.lora.merged_weights), so every engine loads it as before."""
    if hasattr(model, "peft_config"):
        return merged_weights(model, dtype)
    state = model.state_dict()
    aliases = tied_aliases(state)
    # cast where the tensor lives, then copy: a GPU sends bf16 over the bus, not float32 to convert here
    return {
        name: t.detach().to(dtype=dtype if t.is_floating_point() else None, copy=True).cpu()
        for name, t in state.items()
        if name not in aliases
    }


def save_model_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write the model folder next to its destination, then swap it in: a crash never leaves half a model.
    A peft model writes its adapter there and the merged model in `merged/` (models.lora.save_pretrained)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config"):
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp / "merged")
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.rglob("*"):
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


ALIGN = 64  # bytes


def pack_weights(weights: dict[str, torch.Tensor]) -> tuple[list[tuple], torch.Tensor]:
    """One contiguous byte buffer holding every tensor, and where each lies (name, dtype, shape, offset): a
    version as one object for a store that copies per object and pickles per tensor (Ray's: a dict of 311
    tensors of Qwen3-0.6B went in at 0.7 GB/s and came out at 0.4 GB/s)."""
    index, offset = [], 0
    for name, t in weights.items():
        index.append((name, t.dtype, tuple(t.shape), offset))
        offset += -(-t.nbytes // ALIGN) * ALIGN  # each tensor on a cache line: views of any dtype are legal
    buffer = torch.empty(offset, dtype=torch.uint8)
    for (_, _, _, start), t in zip(index, weights.values(), strict=True):
        buffer[start : start + t.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return index, buffer


def unpack_weights(index: list[tuple], buffer) -> dict[str, torch.Tensor]:
    """Views into `buffer` (a uint8 tensor, or an array such as the read-only one Ray maps from its store):
    no copy is made here; the engine's load copies once, into its model."""
    if isinstance(buffer, torch.Tensor):
        data = buffer
    else:
        with warnings.catch_warnings():  # read-only memory: only read here, and copied by the engine's load
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            data = torch.from_numpy(buffer)
    out = {}
    for name, dtype, shape, start in index:
        size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        out[name] = data[start : start + size].view(dtype).view(shape)
    return out


def encode_delta(new: torch.Tensor, old: torch.Tensor, level: int = 1) -> bytes:
    """The bits that changed between two packed versions of the same index (`pack_weights`), XORed and
    compressed with zstd (on every core): a bf16 weight that an update moved by less than half its last
    place is unchanged, so its XOR is zero and compresses away. Exact: `decode_delta` restores `new` bit for
    bit."""
    import zstandard  # the `ray` extra

    if new.shape != old.shape:
        raise ValueError(f"a delta needs versions of one layout: {new.numel()} bytes against {old.numel()}")
    changed = torch.bitwise_xor(new.view(torch.int64), old.view(torch.int64))  # 8 bytes at a time
    return zstandard.ZstdCompressor(level=level, threads=-1).compress(memoryview(changed.numpy()).cast("B"))


def decode_delta(delta: bytes, old: torch.Tensor) -> torch.Tensor:
    """`new` from `encode_delta(new, old)` and `old` (packed buffers)."""
    import zstandard  # the `ray` extra

    changed = zstandard.ZstdDecompressor().decompress(delta, max_output_size=old.numel())
    if len(changed) != old.numel():
        raise ValueError(f"a delta of {len(changed)} bytes does not fit a version of {old.numel()}")
    with warnings.catch_warnings():  # read-only bytes, only read: the XOR writes a new tensor
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        bits = torch.frombuffer(changed, dtype=torch.int64)
    return torch.bitwise_xor(bits, old.view(torch.int64)).view(torch.uint8)
