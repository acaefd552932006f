"""Which device each rollout worker of the `async` runtime decodes on, and whether a GPU shared with the
learner has room for it.

Layouts: by default the workers go where the learner is. On the CPU that is the old layout; on a GPU it
colocates them with the learner, which is allowed only when the estimate below fits in the GPU's free
memory (else a clear error: use `runtime.mode=lag` on one GPU, or other GPUs). `runtime.worker_devices`
places them elsewhere: the usual layout with several GPUs is cuda:0 learning, cuda:1.. generating.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from asympo.config import TrainConfig
from asympo.errors import UserError
from asympo.models.device import Placement, free_memory, resolve_device

LEARNER_BYTES_PER_PARAM = (
    12  # to come once the float32 weights are placed: gradients (4), AdamW's moments (8)
)
HEADROOM = 0.9  # plan on at most this share of the free memory: allocator fragmentation, CUDA context
CUDA_CONTEXT = 512 << 20  # what each process's CUDA context takes on its GPU, roughly
PROMPT_ALLOWANCE = 512  # prompt tokens per sequence assumed by the KV-cache and activation estimates


def kv_cache_bytes(model: PreTrainedModel, sequences: int, tokens: int, element_bytes: int) -> int:
    """Keys and values of `sequences` x `tokens` positions over every layer."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * sequences * tokens * element_bytes


def engine_bytes(
    model: PreTrainedModel, placement: Placement, max_batch: int, tokens: int, kv_copies: int = 1
) -> int:
    """A rollout worker's weights in its dtype plus a full KV cache of `max_batch` x `tokens` positions,
    `kv_copies` times (a re-layout of the slot cache holds the old and the new buffers for a moment)."""
    element = torch.empty((), dtype=placement.dtype).element_size()
    params = sum(p.numel() for p in model.parameters())
    return params * element + kv_copies * kv_cache_bytes(model, max_batch, tokens, element)


def activation_bytes(model: PreTrainedModel, tokens: int, checkpointing: bool, bf16: bool) -> int:
    """What autograd keeps for a micro-batch of `tokens` tokens. Per token and layer under bf16 autocast:
    26h (two RMSNorms' float32 input and output, the bf16 casts feeding five projections) + 8i (the MLP's
    gate, SiLU, up and product) + 4(q + kv) (attention's q, output, k, v), + 6(q + kv) for Qwen3's q/k norms;
    this matched a count of autograd's saved tensors to 0.2%; float32 keeps ~1.5x. With checkpointing each
    layer keeps its float32 input (4h) and one layer at a time is recomputed."""
    c = model.config
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q = c.num_attention_heads * head_dim
    kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * head_dim
    per_layer = 26 * h + 8 * i + 4 * (q + kv) + (6 * (q + kv) if c.model_type == "qwen3" else 0)
    per_layer = per_layer if bf16 else per_layer * 3 // 2
    if checkpointing:
        return tokens * (layers * 4 * h + per_layer)
    return tokens * layers * per_layer


def learner_bytes_to_come(cfg: TrainConfig, model: PreTrainedModel, learner: Placement) -> int:
    """Once the float32 weights are placed: gradients and AdamW's state, one micro-batch's activations, (bf16)
    the evaluation engine's own bf16 copy of the weights, and (behaviour.source=learner) the float32 scratch
    copy that recomputes behaviour log-probs."""
    params = sum(p.numel() for p in model.parameters())
    tokens = cfg.optim.micro_batch_size * (PROMPT_ALLOWANCE + cfg.rollout.max_new_tokens)
    activations = activation_bytes(model, tokens, cfg.optim.gradient_checkpointing, learner.bf16)
    copies = (2 if learner.bf16 else 0) + (4 if cfg.behaviour.source == "learner" else 0)
    return (LEARNER_BYTES_PER_PARAM + copies) * params + activations


def check_memory(free: int, learner: int, workers: int, per_worker: int, device: torch.device) -> None:
    """A clear error, before anything is started, when what goes on a GPU would run it out of memory."""
    need = learner + workers * per_worker
    if need <= HEADROOM * free:
        return
    gib = 1 << 30
    each = f"{workers} rollout worker(s) ~{per_worker / gib:.1f} GiB each (weights, KV cache, CUDA context)"
    if not learner:
        raise UserError(
            f"{device} has {free / gib:.1f} GiB free for {each}: lower rollout.max_batch or spread the "
            "workers over more GPUs"
        )
    raise UserError(
        f"{device} has {free / gib:.1f} GiB free; the learner still needs ~{learner / gib:.1f} GiB "
        f"(gradients, AdamW, activations) and {each}: use runtime.mode=lag on one GPU, put the workers on "
        "other GPUs (runtime.worker_devices=[cuda:1]), or lower rollout.max_batch"
    )


def worker_devices(
    cfg: TrainConfig, learner: Placement, model: PreTrainedModel, remote: bool = False
) -> list[str]:
    """One device name per rollout worker (`runtime.worker_devices`, cycled), checked before any start.

    Unset, the workers go where the learner is: on the CPU as always, and on a GPU colocated with the
    learner, which the memory check below must allow (otherwise its error names the alternatives). Every GPU
    given workers is checked. With Ray (`remote`) Ray picks each actor's GPU, so a name only says "a GPU"
    or "the CPU", and a GPU learner must say where its actors go."""
    rt = cfg.runtime
    names = rt.worker_devices or [str(learner.device)]
    names = [names[i % len(names)] for i in range(rt.workers)]
    if remote:
        if learner.device.type == "cuda" and not rt.worker_devices:
            raise UserError(
                "runtime.backend=ray with the learner on a GPU needs runtime.worker_devices: [cuda] for "
                "actors on a GPU each (Ray picks which; keep the learner's out of Ray's view, docs/gpu.md), "
                "[cpu] for CPU actors"
            )
        return ["cuda" if name.startswith("cuda") else "cpu" for name in names]
    devices = [resolve_device(name) for name in names]
    tokens = PROMPT_ALLOWANCE + cfg.rollout.max_new_tokens
    per_worker = CUDA_CONTEXT + engine_bytes(model, learner, cfg.rollout.max_batch, tokens, kv_copies=2)
    for device in {d for d in devices if d.type == "cuda"}:
        learner_need = learner_bytes_to_come(cfg, model, learner) if device == learner.device else 0
        check_memory(free_memory(device), learner_need, devices.count(device), per_worker, device)
    return [str(d) for d in devices]
