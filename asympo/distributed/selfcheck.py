"""One ShardedLearner step on a fixed batch, run under torchrun; rank 0 saves the step's metrics and the
updated full weights. The equivalence test (tests/integration/test_distributed.py) and the GPU check
(benchmarks/gpu_check.py) compare them with one process's step on the same batch:

    torchrun --nproc_per_node N -m asympo.distributed.selfcheck OUT.pt [objective] [micro_batch] [device]
"""

from __future__ import annotations

import sys

import torch

from asympo.batch import synthetic_batch
from asympo.config import ObjectiveConfig, OptimConfig
from asympo.distributed import group
from asympo.distributed.learner import ShardedLearner
from asympo.models.device import Placement
from asympo.models.load import load_policy

ROWS, LENGTH, LR = 24, 16, 1e-3  # 6 groups of 4 responses


def reference_inputs(micro_batch: int, vocab: int):
    """The batch and optimiser settings both sides use."""
    return synthetic_batch(vocab, rows=ROWS, length=LENGTH), OptimConfig(
        lr=LR, warmup_steps=0, micro_batch_size=micro_batch
    )


def main(out: str, objective: str = "asympo", micro_batch: int = 8, device: str = "cpu") -> None:
    placement = Placement(torch.device(group.local_device(device)), "fp32")
    group.start(placement.device)
    try:
        model, tokenizer = load_policy("tiny")
        batch, optim = reference_inputs(micro_batch, len(tokenizer))
        learner = ShardedLearner(model, ObjectiveConfig(name=objective), optim, placement=placement)
        if group.rank() == 0:
            metrics = learner.step(batch)
            torch.save({"metrics": metrics, "weights": learner.weights(torch.float32)}, out)
            learner.release()
        else:
            learner.follow()
    finally:
        group.stop()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3], *(int(a) for a in sys.argv[3:4]), *sys.argv[4:5])
