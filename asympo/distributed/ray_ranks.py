"""`learner.launcher=ray`: the learner's ranks 1..N-1 are Ray actors that form the process group with the
driver, which is rank 0 and runs the whole `asympo train` loop as under torchrun.

The driver stays rank 0 so that the run keeps its console, progress, signals (Ctrl-C checkpoints) and files
in one process; the followers are placed by Ray (one CPU, or one GPU each, on any node of the cluster) beside
the rollout actors, and reach rank 0 at the driver's node address. A follower that dies (killed, out of
memory, its node lost) ends the run with one line, its last checkpoint intact, as a torchrun rank does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from asympo.config import TrainConfig
from asympo.distributed import group
from asympo.distributed.run import check_supported, follow
from asympo.errors import UserError
from asympo.faults import RunAborted
from asympo.metrics import console

PLACE_TIMEOUT = 300.0  # seconds for Ray to place and start the follower actors
FOLLOWER_GRACE = 30.0  # seconds to let the followers return after the run, or to see which one failed


def uses_ray(cfg: TrainConfig) -> bool:
    """`auto` forms the group with Ray when the rollouts already run on Ray actors."""
    launcher = cfg.learner.launcher
    if launcher == "auto":
        return cfg.runtime.mode == "async" and cfg.runtime.backend == "ray"
    return launcher == "ray"


def free_port(port: int | None = None) -> int:
    """A free port, or `port` (learner.rendezvous_port) if it is free here: rank 0 listens on it."""
    with socket.socket() as s:
        try:
            s.bind(("", port or 0))
        except OSError as e:
            why = e.strerror or e
            raise UserError(f"learner.rendezvous_port={port} cannot be used here: {why}") from None
        return s.getsockname()[1]


def rank_env(rank: int, world: int, address: str, port: int) -> dict[str, str]:
    """What torchrun would set: torch.distributed's env:// rendezvous and asympo's rank reads use these.
    A GPU actor sees only the GPU Ray gave it, as cuda:0, hence LOCAL_RANK 0."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": address,
        "MASTER_PORT": str(port),
    }


def _actor_class():
    import ray  # the `ray` extra

    @ray.remote(max_restarts=0)
    class LearnerRank:
        """A follower rank: the same model and learner as rank 0's, driven by its announcements."""

        def __init__(self, env: dict[str, str], threads: int):
            os.environ.update(env)
            torch.set_num_threads(threads)

        def ready(self) -> int:
            return os.getpid()

        def follow(self, cfg_json: str) -> None:
            cfg = TrainConfig.model_validate_json(cfg_json)
            group.start(torch.device(group.local_device(cfg.device)))
            try:
                follow(cfg)
            finally:
                group.stop()

    return LearnerRank


def check_resources(cfg: TrainConfig, followers: int, gpus: bool) -> None:
    """Actors asking for more than the cluster has would wait forever: say so before any starts."""
    import ray  # the `ray` extra

    have = ray.cluster_resources()
    rollout = cfg.runtime.workers * cfg.runtime.worker_threads if cfg.runtime.mode == "async" else 0
    rollout = rollout if cfg.runtime.backend == "ray" else 0
    cpus = followers + rollout
    if cpus > have.get("CPU", 0):
        raise UserError(
            f"learner.processes={cfg.learner.processes} on Ray needs {followers} CPU(s) for the followers"
            f"{f' and {rollout} for the rollout actors' if rollout else ''}; the Ray cluster has "
            f"{have.get('CPU', 0):g} (a local Ray gets runtime.ray_num_cpus, default all of this machine's)"
        )
    if gpus and followers > have.get("GPU", 0):
        raise UserError(
            f"{followers} GPU follower rank(s) asked for; the Ray cluster has {have.get('GPU', 0):g}"
        )


def train_ray_ranks(cfg: TrainConfig, lead: Callable[[], dict], quiet: bool = False) -> dict:
    """Start N-1 follower actors, join them as rank 0 and run `lead` (rank 0's part,
    asympo.trainer.train_ranks); a dead follower becomes RunAborted."""
    import ray  # the `ray` extra

    from asympo.runtime.ray_backend import connect  # the `ray` extra

    check_supported(cfg)
    world = cfg.learner.processes
    gpus = group.local_device(cfg.device).startswith("cuda")
    owns_ray = connect(cfg.runtime.ray_address, cfg.runtime.ray_num_cpus)
    saved_env = {
        k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    actors, follows = [], []
    try:
        check_resources(cfg, world - 1, gpus)
        address = cfg.learner.rendezvous_host or ray.util.get_node_ip_address()
        port = free_port(cfg.learner.rendezvous_port)
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        LearnerRank = _actor_class()
        for rank in range(1, world):
            options = {"num_cpus": 1, "num_gpus": 1 if gpus else 0, "name": f"asympo-learner-rank-{rank}"}
            actors.append(
                LearnerRank.options(**options).remote(rank_env(rank, world, address, port), threads)
            )
        try:
            ray.get([a.ready.remote() for a in actors], timeout=PLACE_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise UserError(
                f"Ray did not start the {world - 1} follower rank(s) within {PLACE_TIMEOUT:g} s: "
                f"the cluster has {ray.available_resources()} free"
            ) from None
        follows = [a.follow.remote(cfg.model_dump_json()) for a in actors]
        if not quiet:
            console.print(
                f"learner: rank 0 here, ranks 1-{world - 1} Ray actors; the group meets at {address}:{port}"
            )
        os.environ.update(rank_env(0, world, address, port))
        try:
            return lead()
        except (dist.DistError, RuntimeError) as error:
            failed = dead_follower(follows)
            if failed or isinstance(error, dist.DistError):
                why = failed or str(error).splitlines()[0][:200]
                raise RunAborted(
                    f"a learner rank failed ({why}); checkpoints already written in "
                    f"{cfg.out}/checkpoints are intact: continue with resume=true"
                ) from None
            raise
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if follows:
            ray.wait(follows, num_returns=len(follows), timeout=FOLLOWER_GRACE)
        for actor in actors:
            ray.kill(actor)
        if owns_ray:
            ray.shutdown()


def dead_follower(follows: list) -> str:
    """Which follower ended with an error. Ray learns of a death after the socket does, so wait for it, up to
    FOLLOWER_GRACE, and no longer than the first failed follower (the live ones never return here)."""
    import ray  # the `ray` extra

    pending, deadline = list(follows), time.monotonic() + FOLLOWER_GRACE
    while pending and (left := deadline - time.monotonic()) > 0:
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                return f"rank {follows.index(ref) + 1}, a Ray actor: {type(e).__name__}"
    return ""
