"""asympo on a Ray cluster of several nodes, all on this machine (`ray.cluster_utils.Cluster`): each node is
its own raylet with its own object store and CPU resources, so placement, the learner's rendezvous and
object transfer between raylets run as on a real cluster. The head, where the driver connects, has no CPUs:
every actor asympo starts must land on another node.

- A run with a rollout actor and a learner rank (`learner.processes=2`, launched on Ray) on worker nodes
  learns; killing the rollout actor's node (its raylet and every process on it) mid-run loses the node's
  jobs, the actor is replaced on a live node, and the run completes.
- Killing the learner rank's node ends the run with one line, its checkpoint intact, and `resume=true`
  finishes on the nodes left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from asympo.distributed.ray_ranks import free_port
from tests.ray_auth import AUTH, token_auth
from tests.small_runs import read_metrics

RUN = [
    sys.executable, "-m", "asympo", "train", "runtime.mode=async", "runtime.backend=ray",
    "learner.processes=2", "learner.launcher=ray",
    "task.test_size=100", "eval_samples=4", "progress=false", "save_model=false",
]  # fmt: skip
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | AUTH | {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def cluster():
    """A head with no CPUs (the driver's node) and three worker nodes of one CPU each; the test process
    is connected, to see where asympo's actors run and to kill nodes."""
    with token_auth():
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(3):
                nodes.add_node(num_cpus=1)
            nodes.wait_for_nodes()
            ray.init(address=nodes.address, log_to_driver=False)
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()


def asympo_actors(nodes: Cluster) -> dict[str, list]:
    """The nodes that hold asympo's rollout actors and learner ranks, found by the process title Ray gives an
    actor's worker (`ray::RolloutActor...`): a learner rank runs one long method, so it answers no call."""
    placed: dict[str, list] = {"rollout": [], "learner": []}
    for node in nodes.list_all_nodes():
        for raylet in node.all_processes["raylet"]:
            for child in psutil.Process(raylet.process.pid).children():
                title = " ".join(child.cmdline())
                for kind, actor in (("rollout", "ray::RolloutActor"), ("learner", "ray::LearnerRank")):
                    if title.startswith(actor):
                        placed[kind].append(node)
    return placed


def wait_for(condition, seconds: float, run: subprocess.Popen, what: str):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
        time.sleep(0.5)
    return value


def steps_done(out: Path) -> int:
    return len([m for m in read_metrics(out) if "reward" in m]) if (out / "metrics.jsonl").exists() else 0


def test_actors_on_other_nodes_learn_and_a_dead_rollout_node_is_replaced(cluster, tmp_path):
    out, port = tmp_path / "run", free_port()
    rendezvous = ["learner.rendezvous_host=127.0.0.1", f"learner.rendezvous_port={port}"]
    args = [*RUN, f"runtime.ray_address={cluster.address}", f"out={out}", "steps=40", "checkpoint_every=0",
            "runtime.max_staleness=1", *rendezvous]  # fmt: skip
    run = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: steps_done(out) >= 3, 300, run, "three steps")
        placed = asympo_actors(cluster)
        assert len(placed["rollout"]) == 1 and len(placed["learner"]) == 1, placed
        hosts = {node.node_id for kind in placed.values() for node in kind}
        assert cluster.head_node.node_id not in hosts and len(hosts) == 2, placed  # two worker nodes
        cluster.remove_node(
            placed["rollout"][0], allow_graceful=False
        )  # its raylet and every worker process on it
        _, stderr = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, stderr[-3000:]
    assert f"the group meets at 127.0.0.1:{port}" in stderr
    result = json.loads((out / "result.json").read_text())
    assert result["version"] == 40
    assert result["accuracy_after"] >= result["accuracy_before"] + 0.03, result
    steps = [m for m in read_metrics(out) if "reward" in m]
    assert [m["step"] for m in steps] == list(range(40))
    assert steps[-1]["worker_restarts"] == 1 and steps[-1]["lost_jobs"] >= 1


def test_a_dead_learner_node_ends_the_run_in_one_line_and_resume_finishes(cluster, tmp_path):
    out = tmp_path / "run"
    args = [
        *RUN,
        f"runtime.ray_address={cluster.address}",
        f"out={out}",
        "checkpoint_every=2",
        "eval_every=0",
    ]
    run = subprocess.Popen([*args, "steps=400"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    latest = out / "checkpoints" / "latest"
    try:
        wait_for(
            lambda: latest.exists() and latest.read_text().strip() >= "step-000004", 300, run, "a checkpoint"
        )
        (rank_node,) = asympo_actors(cluster)["learner"]
        assert rank_node.node_id != cluster.head_node.node_id
        cluster.remove_node(rank_node, allow_graceful=False)
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("asympo: run stopped: a learner rank failed") and "resume=true" in last, last
    kept = out / "checkpoints" / latest.read_text().strip()
    assert (kept / "shards" / ".metadata").exists()

    # the two nodes left hold the resumed run's rollout actor and learner rank
    resumed = subprocess.run([*args, "steps=8", "resume=true"], env=ENV, capture_output=True, text=True,
                             timeout=400)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["version"] == 8
    trained = [m["step"] for m in read_metrics(out) if "reward" in m]
    assert trained[-1] == 7 and trained == sorted(set(trained))
