"""`asympo train`: one process, or N learner ranks started here (torchrun or Ray actors) with this one as
rank 0 (`learner.processes`, `learner.launcher`)."""

from __future__ import annotations

from asympo.config import TrainConfig
from asympo.distributed import group
from asympo.distributed.ray_ranks import train_ray_ranks, uses_ray
from asympo.distributed.run import check_supported
from asympo.faults import RunAborted
from asympo.trainer import train, train_ranks


def run(cfg: TrainConfig, argv: list[str]) -> dict:
    """`argv`: this command's own arguments, which the torchrun ranks are started with again."""
    role = group.role(cfg.learner.processes)
    if role == "single":
        return train(cfg)
    if role == "rank":
        return train_ranks(cfg)
    check_supported(cfg)
    if uses_ray(cfg):
        return train_ray_ranks(cfg, lambda: train_ranks(cfg))
    status = group.launch(cfg.learner.processes, ["train", *argv])
    if status:
        raise RunAborted(
            f"a learner rank failed (torchrun exit status {status}); checkpoints already written in "
            f"{cfg.out}/checkpoints are intact: continue with resume=true"
        )
    return {}
