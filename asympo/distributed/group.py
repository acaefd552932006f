"""The process group: who this rank is, its device, start and end, and `learner.processes` launching.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; asympo only reads them. `asympo train learner.processes=N`
starts torchrun itself (as a child, so that it can say in one line how a failed run ended).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from asympo.errors import UserError
from asympo.lifetime import child_env

# rank 0 generates and evaluates while the others wait in a broadcast: give them as long as a slow step
TIMEOUT = timedelta(hours=2)


# torchrun's agent, made to end with this launcher (its ranks, in sessions of their own, watch it too)
AGENT = (
    "from asympo.lifetime import exit_with_launcher; exit_with_launcher(); "
    "from torch.distributed.run import main; main()"
)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def role(processes: int) -> Literal["single", "launch", "rank"]:
    """How this process takes part in a run of `processes` learner ranks, decided here only: `rank` inside a
    process group someone started (torchrun, Ray), `launch` to start `processes` ranks, else `single`."""
    if world_size() > 1:
        return "rank"
    return "launch" if processes > 1 else "single"


def local_device(name: str) -> str:
    """CUDA ranks take their own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu" if name == "auto" else name


def start(device: torch.device) -> None:
    """NCCL between GPUs, gloo between CPU processes."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=TIMEOUT)


def stop() -> None:
    """Leave the group cleanly: a process that exits with gloo's group still up can abort at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_processes(processes: int) -> None:
    """Inside torchrun, learner.processes (when set above 1) must match the launcher's world size."""
    world = world_size()
    if processes > 1 and world > 1 and processes != world:
        raise UserError(f"learner.processes={processes}, but torchrun started {world} ranks")


def launch(processes: int, argv: list[str]) -> int:
    """Run `asympo <argv>` as `processes` ranks under torchrun on this machine; its exit status."""
    command = [
        sys.executable,
        "-c",
        AGENT,
        "--standalone",
        f"--nproc_per_node={processes}",
        "--module",
        "asympo",
        *argv,
    ]
    env = child_env() | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=env).returncode
