"""How new weights reach a remote rollout server: pluggable, since servers reload in different ways.

`ServeReload` pushes the weights themselves (safetensors bytes, never pickle) to `asympo serve`'s
`/v1/weights`: the learner's weights live on this machine, the server may not. `NoSync` leaves the server's
weights alone (a server reloaded by other means, or a fixed policy for evaluation).
"""

from __future__ import annotations

from typing import Protocol

import torch
from safetensors.torch import save

from asympo.models.tying import tensor_identity
from asympo.rollout.client import ApiClient, ServerRejected


class WeightSync(Protocol):
    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...


class NoSync:
    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        pass


def to_safetensors(state_dict: dict[str, torch.Tensor]) -> bytes:
    """safetensors refuses tensors that share memory: a tied alias (lm_head = embeddings) is sent once, as
    `save_pretrained` does, and any other sharing is broken by a copy."""
    out: dict[str, torch.Tensor] = {}
    exact, storages = set(), set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        identity = tensor_identity(tensor)
        if identity in exact:
            continue
        exact.add(identity)
        shared = identity[0] in storages
        storages.add(identity[0])
        out[name] = tensor.contiguous().clone() if shared or not tensor.is_contiguous() else tensor
    return save(out)


class ServeReload:
    def __init__(self, client: ApiClient):
        self.client = client

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        reply = self.client.post_bytes("/weights", to_safetensors(state_dict), {"version": version})
        if reply.get("version") != version:
            raise ServerRejected(f"the server answered version {reply.get('version')} to a push of {version}")


def make_sync(kind: str, client: ApiClient) -> WeightSync:
    return ServeReload(client) if kind == "serve" else NoSync()
