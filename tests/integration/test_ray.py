"""The Ray backend on a real local Ray: training learns, the staleness bound holds, a SIGKILLed rollout actor
is replaced (and past the limit the run stops), a bad cluster address is a one-line error.

Ray runs with token auth, as Ray 2.60 does by default, with the token in RAY_AUTH_TOKEN so that nothing is
written to ~/.ray: the training subprocesses join the test's cluster the way a user joins one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from test_async import train_steps

from asympo.batch import make_batch
from asympo.config import ObjectiveConfig, OptimConfig, RolloutConfig, TaskConfig
from asympo.data.tasks import train_stream
from asympo.faults import RunAborted
from asympo.learner import Learner
from asympo.models.load import load_policy
from asympo.models.weights import pack_weights
from asympo.rewards.exact import exact_match
from asympo.runtime.ray_backend import RayRuntime
from tests.ray_auth import AUTH, token_auth
from tests.small_runs import read_metrics

ROLLOUT = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6)
TRAIN = [sys.executable, "-m", "asympo", "train", "runtime.backend=ray", "eval_every=0", "progress=false"]
SMALL_RUN = [*TRAIN, "save_model=false", "checkpoint_every=0"]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (~5 s, ~350 MB); yields its address."""
    with token_auth():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def train_cli(out: Path, *overrides: str, wait: bool = True):
    """`asympo train runtime.backend=ray` in a subprocess with the test's auth token and no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | AUTH
    args = [*SMALL_RUN, f"out={out}", *overrides]
    if wait:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def step_metrics(out: Path) -> list[dict]:
    exists = (out / "metrics.jsonl").exists()
    return [m for m in read_metrics(out) if "reward" in m] if exists else []


def kill(actor) -> None:
    """SIGKILL the actor's process: a crash, not a polite `ray.kill`."""
    os.kill(ray.get(actor.pid.remote(), timeout=120), signal.SIGKILL)


def test_a_bad_cluster_address_is_one_line_and_exit_code_2(tmp_path):
    done = train_cli(tmp_path / "run", "runtime.ray_address=127.0.0.1:1", "steps=1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "asympo: error: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused"
    ]


def test_ray_training_starts_its_own_ray_learns_and_bounds_staleness(tmp_path):
    """No address: the run starts (and stops) its own local Ray. 40 steps lift held-out accuracy."""
    out = tmp_path / "run"
    done = train_cli(out, "steps=40", "eval_samples=4", "task.test_size=100", "runtime.max_staleness=1")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["version"] == 40 and result["skipped_steps"] == 0
    assert result["accuracy_after"] >= result["accuracy_before"] + 0.03, result
    steps = step_metrics(out)
    assert [m["step"] for m in steps] == list(range(40))
    assert max(int(k) for m in steps for k in m["staleness_hist"]) <= 1  # the admission bound holds
    for m in steps:
        assert {"buffer_groups", "worker_busy", "learner_busy", "wait_time", "dropped_stale"} <= set(m)
        assert m["worker_restarts"] == 0 and m["lost_jobs"] == 0


def test_runtime_versions_restart_and_restart_limit(cluster):
    """In-process, on the test's Ray: new versions reach the actor, the bound holds, a killed actor is
    replaced and batches keep coming; a second death passes max_worker_restarts=1 and stops the run."""
    model, tokenizer = load_policy("tiny")
    learner = Learner(model, ObjectiveConfig(name="pg"), OptimConfig(lr=1e-3, warmup_steps=0))
    score = lambda items: [exact_match(text, answer) for text, answer in items]  # noqa: E731
    stream = train_stream(TaskConfig(), 0)
    runtime = RayRuntime(
        "tiny", learner.weights(), 0, stream, score, ROLLOUT, seed=0, max_staleness=1, max_worker_restarts=1
    )

    def train(steps: int) -> list[tuple[int, list[int], dict]]:
        return train_steps(learner, tokenizer, runtime, steps)

    try:
        assert runtime.owns_ray is False  # it uses the Ray that was already up, and leaves it up
        seen = train(6)
        for version, sample_versions, stats in seen:
            assert len(sample_versions) == ROLLOUT.prompts_per_step * ROLLOUT.group_size
            assert all(0 <= version - v <= 1 for v in sample_versions)
            assert 0.0 <= stats["worker_busy"] <= 1.0
        assert max(v for _, vs, _ in seen for v in vs) >= 3  # the actor really picks up published versions
        kill(runtime.workers[0].actor)
        seen = train(3)
        assert runtime.counts["worker_restarts"] == 1 and seen[-1][2]["worker_restarts"] == 1
        assert runtime.counts["lost_jobs"] >= 1
        kill(runtime.workers[0].actor)
        with pytest.raises(RunAborted, match="max_worker_restarts=1"):
            train(3)
    finally:
        runtime.close()
    assert runtime.cursor >= 9 * ROLLOUT.prompts_per_step
    assert ray.is_initialized()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_publishing_gives_the_actor_the_learners_weights_bit_for_bit(cluster, dtype):
    """runtime.publish=delta: an actor holding the version before takes the XOR delta and ends with exactly
    the weights published (a SHA-256 of them); in bf16 the deltas are a fraction of a version."""
    model, tokenizer = load_policy("tiny")
    learner = Learner(model, ObjectiveConfig(name="pg"), OptimConfig(lr=1e-4, warmup_steps=0))
    score = lambda items: [exact_match(text, answer) for text, answer in items]  # noqa: E731
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    runtime = RayRuntime(
        "tiny", learner.weights(dtype), 0, train_stream(TaskConfig(), 0), score, ROLLOUT, seed=0,
        max_staleness=1, precision=precision, delta=True,
    )  # fmt: skip
    sizes = []
    try:
        for step in range(6):
            samples, stats = runtime.next_batch(step)
            if step:
                sizes.append((stats["publish_delta_bytes"], stats["publish_bytes"]))
            learner.step(make_batch(samples, tokenizer.pad_token_id, "group_norm"))
            runtime.publish(learner.version, learner.weights(dtype))
        runtime.next_batch(6)  # the actor's jobs since the last publish load it
        deadline = time.monotonic() + 60
        while (held := ray.get(runtime.workers[0].actor.held.remote()))[0] != learner.version:
            assert time.monotonic() < deadline, held[:1]
            runtime.next_batch(7)
    finally:
        runtime.close()
    _, published = pack_weights(learner.weights(dtype))
    version, digest, loads = held
    assert digest == hashlib.sha256(published.numpy().tobytes()).hexdigest(), (version, loads, sizes)
    assert loads["delta"] >= 1 and loads["whole"] >= 1  # the first version comes whole
    assert all(0 < delta < whole for delta, whole in sizes), sizes
    if dtype == torch.bfloat16:
        assert max(delta / whole for delta, whole in sizes) < 0.5, sizes


def test_delta_publishing_outside_ray_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "train", "runtime.publish=delta", f"out={tmp_path}", "steps=1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "asympo: error: runtime.publish=delta is for Ray actors (runtime.backend=ray): local workers read "
        "each version from one copy in shared memory, and remote engines reload whole files"
    ]


def test_a_sigkilled_actor_mid_run_is_replaced_and_the_run_completes(cluster, tmp_path):
    """`asympo train` joins the test's cluster with two actors; one is SIGKILLed after a few steps."""
    out = tmp_path / "run"
    mine = ray.get_runtime_context().namespace
    run = train_cli(
        out,
        f"runtime.ray_address={cluster}",
        "runtime.workers=2",
        "steps=20",
        "rollout.prompts_per_step=8",
        "task.test_size=20",
        "eval_samples=1",
        wait=False,
    )
    try:
        deadline = time.monotonic() + 180
        while len(step_metrics(out)) < 3:
            assert run.poll() is None, run.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no training steps within 180 s"
            time.sleep(0.2)
        actors = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("asympo-rollout-") and a["namespace"] != mine
        ]
        assert len(actors) == 2, actors
        kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]))
        _, stderr = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, stderr[-2000:]
    steps = step_metrics(out)
    assert [m["step"] for m in steps] == list(range(20))
    assert steps[-1]["worker_restarts"] == 1 and steps[-1]["lost_jobs"] >= 1
    assert max(int(k) for m in steps for k in m["staleness_hist"]) <= 2  # the default max_staleness


def test_a_sigkilled_driver_takes_its_actors_but_leaves_a_joined_cluster(cluster, tmp_path):
    """asympo joined the test's cluster: SIGKILL of the driver ends asympo's own actors (Ray ends an owner's
    actors) within 15 s, and the cluster, which asympo did not start, keeps running."""
    from asympo.lifetime import alive

    out = tmp_path / "run"
    mine = ray.get_runtime_context().namespace
    run = train_cli(out, f"runtime.ray_address={cluster}", "runtime.workers=2", "steps=200", wait=False)
    try:
        deadline = time.monotonic() + 180
        while len(step_metrics(out)) < 2:
            assert run.poll() is None, run.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no training steps within 180 s"
            time.sleep(0.2)
        named = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("asympo-rollout-") and a["namespace"] != mine
        ]
        pids = [ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).pid.remote()) for a in named]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        os.kill(run.pid, signal.SIGKILL)
        run.communicate()
        deadline = time.monotonic() + 15
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not any(alive(p) for p in pids), "asympo's actors outlived their driver"
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert ray.get(ray.put(7)) == 7 and ray.cluster_resources().get("CPU") == 2  # the cluster lives on
