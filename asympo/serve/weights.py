"""New weights for the served model: safetensors only (never pickle), checked key by key against the model.

A reload that does not fit the model (wrong architecture, a truncated upload) is refused as a whole with a
400, before anything is copied, so the old weights keep serving.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file

from asympo.models.tying import tensor_identity
from asympo.serve.errors import ApiError


def read_path(path: object) -> dict[str, torch.Tensor]:
    """A `.safetensors` file, or a model folder: every `*.safetensors` file in it (shards included)."""
    if not isinstance(path, str) or not path:
        raise ApiError(400, "'path' must be a string: a .safetensors file or a model folder", "invalid_path")
    where = Path(path).expanduser()
    if not where.is_absolute():
        raise ApiError(400, f"'path' must be absolute (the server's working folder is not yours): {path}")
    files = sorted(where.glob("*.safetensors")) if where.is_dir() else [where]
    if not files or not files[0].is_file():
        raise ApiError(400, f"no safetensors weights at {path}", "invalid_path")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ApiError(400, f"cannot read {file} as safetensors: {e}", "invalid_weights") from None
    return state


def read_bytes(data: bytes) -> dict[str, torch.Tensor]:
    if not data:
        raise ApiError(400, "the request body is empty: send the safetensors bytes", "invalid_weights")
    try:
        return load(data)
    except (SafetensorError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid safetensors: {e}", "invalid_weights") from None


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every key known with its exact shape, and every weight given; a tied alias (`lm_head.weight` sharing
    the embedding) may be left out, as `save_pretrained` does."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ApiError(
            400, f"unknown weights for this model: {', '.join(unknown[:3])}{more}", "weights_mismatch"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ApiError(
                400,
                f"weight {name} has shape {list(tensor.shape)}, the model expects {list(own[name].shape)}",
                "weights_mismatch",
            )
        if not (tensor.is_floating_point() or tensor.dtype == own[name].dtype):
            raise ApiError(400, f"weight {name} has dtype {tensor.dtype}, expected {own[name].dtype}")
    given = {tensor_identity(own[name]) for name in state}
    missing = [name for name, t in own.items() if name not in state and tensor_identity(t) not in given]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ApiError(400, f"missing weights: {', '.join(missing[:3])}{more}", "weights_mismatch")
