"""`asympo train` on N ranks: what every rank agrees on, and the followers' part (rank 0 runs the Trainer,
asympo.trainer.train_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from asympo.config import TrainConfig
from asympo.distributed import group
from asympo.distributed.learner import ShardedLearner
from asympo.errors import UserError
from asympo.models.device import Placement, resolve
from asympo.models.load import load_policy


def check_supported(cfg: TrainConfig) -> None:
    """What the data-parallel learner does not do yet fails before any rank starts work."""
    if cfg.lora.rank > 0:
        raise UserError("learner.processes > 1 with lora.rank > 0 is not supported yet: use one of them")


def agreed_placement(cfg: TrainConfig, model: torch.nn.Module) -> Placement:
    """Every rank on its own device, all in the precision rank 0 chose (a CPU measurement could differ)."""
    device = group.local_device(cfg.device)
    choice = [resolve(device, cfg.precision, model).precision if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return resolve(device, choice[0], model)


def follow(cfg: TrainConfig) -> None:
    """A rank > 0: the same model and learner as rank 0's, driven by rank 0 until the run ends."""
    torch.manual_seed(cfg.seed)
    model, _ = load_policy(cfg.model)
    placement = agreed_placement(cfg, model)
    temperature = cfg.rollout.temperature or 1.0
    learner = ShardedLearner(
        model, cfg.objective, cfg.optim, temperature, cfg.rollout.max_new_tokens, placement
    )
    learner.follow()
