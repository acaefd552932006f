"""Tied weights (an output head that is the input embedding): one tensor under two names in a state dict."""

from __future__ import annotations

import torch


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """Equal for two names of the very same tensor (storage, offset, shape, stride). A DTensor (a sharded
    parameter) has no storage of its own: it is compared by its local shard."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


def tied_aliases(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """The names whose tensor already appeared under an earlier name (`lm_head.weight` when tied): the
    ones `save_pretrained` leaves out, and a load may do without."""
    seen, aliases = set(), set()
    for name, tensor in state_dict.items():
        identity = tensor_identity(tensor)
        if identity in seen:
            aliases.add(name)
        seen.add(identity)
    return aliases
