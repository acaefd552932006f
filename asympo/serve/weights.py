"""New weights for the served model: safetensors only (never pickle), checked key by key against the model.

A reload that does not fit the model (wrong architecture, a truncated upload, NaN or inf values) is refused as
a whole with a 400, before anything is copied, so the old weights keep serving. The JSON `path` form reads
only under the folder set by `weights_dir` (off unless set), and its errors never say whether a file exists
or what a file holds: the client learns only that the path did not give usable weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file

from asympo.models.tying import tensor_identity
from asympo.serve.errors import ApiError

HEADER_SLACK = 2**20  # a safetensors header: JSON naming each tensor, its dtype, shape and offsets
BYTES_PER_WEIGHT = 4  # a reload may come as float32 even for a bf16 model; float64 is refused by size


def upload_limit(model: torch.nn.Module) -> int:
    """The largest raw-bytes reload worth reading: the model's weights at 4 bytes each (a tied alias counted
    as if sent twice), plus a header."""
    own = model.state_dict()
    return sum(t.numel() for t in own.values()) * BYTES_PER_WEIGHT + HEADER_SLACK + 512 * len(own)


def read_path(path: object, root: Path | None) -> dict[str, torch.Tensor]:
    """A `.safetensors` file, or a model folder (every `*.safetensors` file in it), inside `root`."""
    if root is None:
        raise ApiError(
            403,
            "reloading from a server-side path is off: start the server with weights_dir=FOLDER",
            "forbidden",
        )
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ApiError(400, "'path' must be a string: a .safetensors file or a model folder", "invalid_path")
    refused = ApiError(400, "no usable safetensors weights at that path under weights_dir", "invalid_path")
    base = root.resolve()
    try:
        where = (base / path).resolve()  # an absolute `path` replaces `base`; checked just below
    except (OSError, RuntimeError, ValueError):
        raise refused from None
    if where != base and base not in where.parents:
        raise refused
    try:
        files = sorted(where.glob("*.safetensors")) if where.is_dir() else [where]
        files = [f.resolve() for f in files]
        if not files or not all(f.is_file() and base in f.parents for f in files):
            raise refused
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise refused from None  # the reason could echo a crafted header or tell what exists: never sent
    return state


def read_bytes(data: bytes) -> dict[str, torch.Tensor]:
    if not data:
        raise ApiError(400, "the request body is empty: send the safetensors bytes", "invalid_weights")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError):
        raise ApiError(400, "the request body is not valid safetensors", "invalid_weights") from None


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every key known with its exact shape, every value finite, and every weight given; a tied alias
    (`lm_head.weight` sharing the embedding) may be left out, as `save_pretrained` does."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        shown = ", ".join(repr(name[:80]) for name in unknown[:3])
        raise ApiError(400, f"unknown weights for this model: {shown}{more}", "weights_mismatch")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ApiError(
                400,
                f"weight {name} has shape {list(tensor.shape)}, the model expects {list(own[name].shape)}",
                "weights_mismatch",
            )
        if not (tensor.is_floating_point() or tensor.dtype == own[name].dtype):
            raise ApiError(400, f"weight {name} has dtype {tensor.dtype}, expected {own[name].dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ApiError(400, f"weight {name} has NaN or infinite values", "invalid_weights")
    given = {tensor_identity(own[name]) for name in state}
    missing = [name for name, t in own.items() if name not in state and tensor_identity(t) not in given]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ApiError(400, f"missing weights: {', '.join(missing[:3])}{more}", "weights_mismatch")
