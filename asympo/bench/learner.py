"""Learner cost: an `asympo` step against a `decoupled_ppo` step on the same batch, and the learner's FLOP/s
against this machine's matmul peak measured in the same run.

A current-policy objective takes one forward and one backward per micro-batch; `decoupled_ppo` adds a no-grad
forward under the proximal policy. With backward ~2x forward, the floor is 3/4 = 0.75x; the optimiser step,
shared by both, pulls the ratio towards 1. A third learner, `asympo` with the token entropy off, prices the
entropy metric that every step logs (goal: under 5% of a step).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from transformers import PreTrainedModel

from asympo.batch import TrainBatch, synthetic_batch
from asympo.config import ObjectiveConfig, OptimConfig
from asympo.learner import Learner
from asympo.models.device import CPU_FP32, Placement


def step_flops(model: PreTrainedModel, batch: TrainBatch) -> float:
    """Model FLOPs of one forward + backward (3x forward): the decoder's matmuls on every real token, the
    output head on the scored (response) tokens only, causal attention. Recomputation is not counted."""
    config = model.config
    head = model.get_output_embeddings()
    decoder_params = sum(
        m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)
    )
    tokens = float(batch.attention_mask.sum())
    scored = float(batch.response_mask.sum())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = batch.attention_mask.sum(-1).double()
    # QK^T and AV on the causal triangle: 2 matmuls x 2 FLOPs x S(S+1)/2 pairs x head_dim, per head, per layer
    attention = float((2 * lengths * (lengths + 1)).sum()) * heads * head_dim * config.num_hidden_layers
    forward = 2 * decoder_params * tokens + 2 * head.weight.numel() * scored + attention
    return 3 * forward


def matmul_peak(
    sizes: tuple[int, ...] = (1024, 2048),
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """The best FLOP/s of square `dtype` matmuls with torch's current threads: the physical reference for a
    learner computing in that dtype."""
    best, best_n = 0.0, sizes[0]
    device = torch.device(device)
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = 2 * n**3 / (time.perf_counter() - start)
            if rate > best:
                best, best_n = rate, n
    return best, best_n


def alternate_steps(learners: dict[str, Learner], batch: TrainBatch, repeats: int) -> dict[str, list[float]]:
    """Seconds of each learner's step on `batch`, `repeats` rounds, the learners back to back in each round
    so that drift in machine load hits all alike; round 0 warms up (allocator, Adam state) and is not
    counted. Synchronises a CUDA device around each step."""
    times: dict[str, list[float]] = {name: [] for name in learners}
    for round_ in range(repeats + 1):
        for name, learner in learners.items():
            cuda = learner.placement.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(learner.placement.device)
            start = time.perf_counter()
            learner.step(batch)
            if cuda:
                torch.cuda.synchronize(learner.placement.device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def learner_steps(
    model: PreTrainedModel,
    vocab: int,
    rows: int,
    length: int,
    repeats: int,
    say=print,
    placement: Placement = CPU_FP32,
) -> dict[str, float]:
    """Time `asympo`, `decoupled_ppo` and `asympo` without the entropy metric on one batch, alternating so
    that noise hits all alike."""
    batch = synthetic_batch(vocab, rows, length)
    optim = OptimConfig(micro_batch_size=rows, warmup_steps=0)
    learners = {
        name: Learner(copy.deepcopy(model), ObjectiveConfig(name=name), optim, placement=placement)
        for name in ("asympo", "decoupled_ppo")
    }
    learners["no_entropy"] = Learner(copy.deepcopy(model), ObjectiveConfig(), optim, placement=placement)
    learners["no_entropy"].track_entropy = False
    times = alternate_steps(learners, batch, repeats)
    asympo, ppo, plain = (statistics.median(times[n]) for n in learners)

    def ratio(name: str) -> float:
        """Each round's own ratio: the steps of a round ran back to back, so slow drift in load cancels."""
        return statistics.median(a / b for a, b in zip(times["asympo"], times[name], strict=True))

    flops = step_flops(model, batch)
    say(
        f"learner: {rows} x {length} tokens, asympo step {asympo:.2f} s, decoupled_ppo step {ppo:.2f} s, "
        f"without entropy {plain:.2f} s, {flops / 1e9:.1f} GFLOP per asympo step"
    )
    return {
        "asympo_s": asympo,
        "decoupled_ppo_s": ppo,
        "ratio": ratio("decoupled_ppo"),
        "no_entropy_s": plain,
        "entropy_ratio": ratio("no_entropy"),
        "step_gflop": flops / 1e9,
    }
