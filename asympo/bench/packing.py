"""Padding in the learner: the same long-tailed batch stepped four ways, alternating so noise hits all alike.

- `padded`: every micro-batch as wide as the batch's longest sequence (asympo before micro-batches were cut);
- `none`: each micro-batch cut to its own longest sequence, groups in batch order (the default);
- `sorted` (`optim.packing=sorted`): the same, longest groups first, so similar lengths share a micro-batch;
- `packed` (`optim.packing=packed`): several sequences per row, attention kept inside each.

RL response lengths are long-tailed: most stop early, a few hit the cap. The batch here has groups of 8
whose responses stop after an eighth to a quarter of the cap, and one group in four with a response at the
cap. The figure that counts is real (unpadded) tokens per second.
"""

from __future__ import annotations

import copy
import random
import statistics

import torch
from transformers import PreTrainedModel

from asympo.batch import TrainBatch, make_batch, micro_batches
from asympo.bench.learner import alternate_steps
from asympo.config import ObjectiveConfig, OptimConfig
from asympo.learner import Learner
from asympo.models.device import CPU_FP32, Placement
from asympo.rollout.base import Sample

GROUP = 8


class PaddedLearner(Learner):
    """Micro-batches as wide as the whole batch: the path before they were cut, for comparison."""

    def plan(self, batch: TrainBatch) -> list[tuple[TrainBatch, float]]:
        parts = micro_batches(batch, self.optim_cfg.micro_batch_size)
        rows = [
            torch.cat([(batch.group_ids == g).nonzero()[:, 0] for g in p.group_ids.unique()]) for p in parts
        ]
        return [(batch.select(r), 1.0) for r in rows]


def long_tailed_batch(vocab: int, rows: int, length: int, seed: int = 0) -> TrainBatch:
    """`rows` sequences of a 16-token prompt and a response of at most `length - 16` tokens, long-tailed."""
    rng, cap = random.Random(seed), max(length - 16, 8)
    samples = []
    for i in range(rows):
        group = i // GROUP
        long = group % 4 == 0 and i % GROUP == 0
        size = cap if long else rng.randint(max(cap // 8, 1), max(cap // 4, 1))
        ids = [rng.randrange(4, vocab) for _ in range(16 + size)]
        samples.append(Sample("", ids[:16], ids[16:], "", "stop", 0, reward=float(i % 2), group=group))
    return make_batch(samples, 0, "group_norm")


def packing_steps(
    model: PreTrainedModel,
    vocab: int,
    rows: int,
    length: int,
    repeats: int,
    say=print,
    placement: Placement = CPU_FP32,
) -> dict[str, float]:
    batch = long_tailed_batch(vocab, rows, length)
    size = max(GROUP, rows // 4)  # four micro-batches
    learners = {
        name: cls(
            copy.deepcopy(model),
            ObjectiveConfig(),
            OptimConfig(micro_batch_size=size, packing=packing, warmup_steps=0),
            placement=placement,
        )
        for name, cls, packing in (
            ("padded", PaddedLearner, "none"),
            ("none", Learner, "none"),
            ("sorted", Learner, "sorted"),
            ("packed", Learner, "packed"),
        )
    }
    shares = {name: learner.step(batch)["pad_share"] for name, learner in learners.items()}
    times = alternate_steps(learners, batch, repeats)
    real = float(batch.attention_mask.sum())
    out = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    out |= {f"{name}_pad_share": share for name, share in shares.items()}
    out |= {f"{name}_tokens_per_s": real / out[f"{name}_s"] for name in learners}
    for name in ("none", "sorted", "packed"):  # each round's own ratio: slow drift in load cancels
        out[f"{name}_speedup"] = statistics.median(
            p / t for p, t in zip(times["padded"], times[name], strict=True)
        )
    say(
        f"packing: {rows} x <= {length} tokens, micro-batches of {size}; padding "
        + ", ".join(f"{n} {shares[n]:.0%}" for n in learners)
    )
    return out
