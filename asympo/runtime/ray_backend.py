"""The `async` runtime on Ray (`runtime.backend=ray`): rollout workers are Ray actors, the learner is the
driver. Each published version goes into the object store once (one `ray.put` of one byte buffer); an actor
fetches it only when its own weights are older, reads it in place and copies it into its model. The same
bounded-staleness buffer as the local runtime decides what trains. Under LoRA (`lora.rank > 0`) each actor
wraps its own base with the same adapters, and a version is only the adapter tensors (the scaling travels in
the LoRA config the actors are built with).

Joining a cluster (`runtime.ray_address=HOST:PORT`, or the RAY_ADDRESS environment variable): asympo must
be installed on every node and the model name or path must resolve there. Ray 2.60 clusters use token
authentication by default; joining one by address needs `RAY_AUTH_MODE=token` and the cluster's token in
`RAY_AUTH_TOKEN`, in a file named by `RAY_AUTH_TOKEN_PATH`, or in `~/.ray/auth_token` (with `auto`, a token
found there turns token mode on by itself). Without them Ray reports a failed connection after ~20 s.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asympo.config import EnvConfig, RolloutConfig
from asympo.data.tasks import Problem
from asympo.envs.episodes import generate_groups, make_episodes
from asympo.errors import UserError
from asympo.faults import RunAborted, StopWaiting
from asympo.lifetime import children, reap_when_gone
from asympo.models.device import for_engine, resolve
from asympo.models.load import load_policy
from asympo.models.lora import apply_lora
from asympo.models.weights import (
    decode_delta,
    encode_delta,
    pack_weights,
    publishable_weights,
    unpack_weights,
)
from asympo.rollout.base import Sample
from asympo.rollout.hf import HFEngine
from asympo.runtime.buffer import (
    BusyMeter,
    Job,
    LatencyMeter,
    Scorer,
    StalenessBuffer,
    job_seed,
    publish_latencies,
)

try:
    import ray
except ImportError:  # pragma: no cover - depends on the environment
    raise UserError("runtime.backend=ray needs Ray: pip install 'asympo[ray]'") from None

CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster before giving up (ray.init retries for minutes)


@ray.remote(concurrency_groups={"control": 1})
class RolloutActor:
    """One rollout worker. Jobs run one at a time; `offer` and `pid` run on their own thread, so a version
    published while a job waits in the queue is still the one the job starts with."""

    def __init__(
        self,
        model: str,
        rollout: RolloutConfig,
        threads: int,
        return_logprobs: bool,
        device: str,
        precision: str,
        lora=None,
        env: EnvConfig | None = None,
    ):
        torch.set_num_threads(threads)
        policy, tokenizer = load_policy(model)
        # an actor given a GPU sees only that one; the precision setting is resolved for it here
        policy = for_engine(
            policy, resolve("cuda" if device.startswith("cuda") else "cpu", precision, policy)
        )
        if lora is not None:  # the learner's adapters on this base: each version sends only them
            apply_lora(policy, lora)
        self.engine = HFEngine(
            policy,
            tokenizer,
            version=-1,
            return_logprobs=return_logprobs,
            max_batch=rollout.max_batch,
            inflight_kv=rollout.inflight_kv,
        )
        self.rollout = rollout
        self.episodes = make_episodes(env, tokenizer) if env is not None else None
        self.lock = threading.Lock()
        # (version, [ObjectRef], publish wall time): the ref boxed in a list, so Ray does not fetch it
        self.newest: tuple[int, list, float] = (-1, [], 0.0)
        self.published: dict[int, float] = {}  # versions loaded and not yet used: their publish times
        self.loads = {"whole": 0, "delta": 0}

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="control")
    def held(self) -> tuple[int, str, dict[str, int]]:
        """The engine's version, a SHA-256 of its weights (packed, tied alias left out) and how many
        versions it loaded whole and from deltas: what a driver can check against what it published. While
        a job loads a newer version the digest may be of neither: ask when the version is the newest."""
        version = self.engine.version  # first: a load in progress sets it only once its copy is done
        _, buffer = pack_weights(publishable_weights(self.engine.model))
        return version, hashlib.sha256(buffer.numpy().tobytes()).hexdigest(), dict(self.loads)

    @ray.method(concurrency_group="control")
    def offer(self, version: int, weights: list, published_at: float) -> None:
        self._note(version, weights, published_at)

    def generate(
        self, problems: list[Problem], seed: int, version: int, weights: list, published_at: float
    ) -> tuple[list[list[Sample]], float, list[float]]:
        """The groups for `prompts` from the newest version this actor knows of (with in-flight updates, also
        those offered while it generates), the seconds it took, and the publish-to-use latencies."""
        self._note(version, weights, published_at)
        self._refresh()
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        inflight = self._refresh if self.rollout.weight_updates == "inflight" else None
        n = self.rollout.group_size
        groups = generate_groups(self.engine, problems, n, self.rollout, generator, inflight, self.episodes)
        if inflight is None:  # versions offered while this job generated, unused by it
            for sample in (s for group in groups for s in group):
                sample.version_end = self.newest[0]
        latencies = publish_latencies(self.engine.first_tokens, self.published)
        return groups, time.perf_counter() - start, latencies

    def _refresh(self) -> bool:
        """Load the newest offered version if the engine has an older one (between jobs, or between decode
        steps with in-flight updates); whether it did."""
        with self.lock:
            version, weights, published_at = self.newest
        if version == self.engine.version:
            return False
        first = self.engine.version < 0
        self.engine.load_weights(self._fetch(weights), version)
        if not first:  # the first load waits for the model to load: no publish-to-use latency
            self.published[version] = published_at
        return True

    def _fetch(self, boxed: list) -> dict[str, torch.Tensor]:
        """The version's tensors: rebuilt from the delta when this engine holds the version it applies to
        (`RayRuntime._put`), else views of the whole version in the store (the engine's load copies)."""
        whole, base, delta = (boxed + [-1, None])[:3]
        if delta is not None and base == self.engine.version:
            index, changed = ray.get(delta)
            state = self.engine.model.state_dict()
            if all(name in state and state[name].dtype == dtype for name, dtype, *_ in index):
                _, held = pack_weights({name: state[name] for name, *_ in index})
                self.loads["delta"] += 1
                return unpack_weights(index, decode_delta(changed, held))
        self.loads["whole"] += 1
        return unpack_weights(*ray.get(whole))

    def _note(self, version: int, weights: list, published_at: float) -> None:
        with self.lock:
            if version > self.newest[0]:
                self.newest = (version, weights, published_at)


def put_version(index: list[tuple], buffer: torch.Tensor) -> ray.ObjectRef:
    """A packed version (`pack_weights`) into the object store: an actor's `ray.get` maps it as a numpy
    array, without a copy (a dict of tensors came out at 0.3 GB/s: asympo/bench/publish.py)."""
    return ray.put((index, buffer.numpy()))


def check_reachable(address: str) -> None:
    """ray.init retries an unreachable address for minutes: try a plain TCP connection first."""
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"runtime.ray_address '{address}' is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Join `address` (or RAY_ADDRESS), or start a local Ray; True when this call set Ray up (and so
    `ray.shutdown()` is ours to call: it stops a local Ray, and only disconnects from a cluster)."""
    if ray.is_initialized():  # e.g. a notebook or test that set up Ray itself
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address in (None, "local"):
        ray.init("local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
        # the local Ray is ours: if this process dies (even SIGKILL), its services and actors go with it
        reap_when_gone(os.getpid(), children(os.getpid(), marker="/ray/"))
        return True
    if address != "auto":
        check_reachable(address)
    try:
        ray.init(address=address, **quiet)
    except ray.exceptions.AuthenticationError as e:
        raise UserError(f"cannot join the Ray cluster at {address}: {e}") from None
    except ConnectionError as e:
        raise UserError(
            f"cannot join the Ray cluster at {address}: {e} (a cluster with token auth needs "
            "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        ) from None
    return True


def local_path(model: str) -> str:
    """An actor's working directory need not be ours: a relative model folder becomes absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


@dataclass
class ActorSlot:
    """One rollout actor and the jobs it has not answered yet."""

    actor: ray.actor.ActorHandle
    in_flight: dict[ray.ObjectRef, Job] = field(default_factory=dict)
    ready: bool = False  # it has returned a job: its model is loaded and it takes offers at once


class RayRuntime:
    """Same interface, stats and counts as `AsyncRuntime`; see the module docstring for the data flow."""

    history = ()
    keeps_every_version = False
    in_process_engine = None

    def __init__(
        self,
        model: str,
        weights: dict[str, torch.Tensor],
        version: int,
        problems: Iterator[Problem],
        score: Scorer,
        rollout: RolloutConfig,
        seed: int,
        workers: int = 1,
        worker_threads: int = 1,
        max_staleness: int = 2,
        jobs_per_worker: int = 2,
        max_worker_restarts: int = 5,
        return_logprobs: bool = True,
        devices: list[str] | None = None,
        precision: str = "fp32",
        address: str | None = None,
        num_cpus: int | None = None,
        lora=None,
        env: EnvConfig | None = None,
        delta: bool = False,
    ):
        self.model, self.rollout, self.problems, self.score, self.seed = model, rollout, problems, score, seed
        self.delta = delta  # runtime.publish=delta: also a compressed XOR against the version before
        self.sent: tuple[int, list, torch.Tensor] | None = None  # that version: number, index, packed bytes
        self.counts_bytes = {"publish_bytes": 0, "publish_delta_bytes": 0}
        self.env = env
        self.depth, self.max_restarts, self.threads = jobs_per_worker, max_worker_restarts, worker_threads
        self.return_logprobs = return_logprobs
        self.devices, self.precision = devices or ["cpu"] * workers, precision
        # lora.rank > 0: actors wrap their base with the same adapters; `weights` are adapter tensors only
        self.lora = lora if lora is not None and lora.rank > 0 else None
        self.adapters_only = self.lora is not None
        self.lag = max_staleness  # what the behaviour-log-prob snapshot store must cover
        self.job_prompts = math.ceil(rollout.prompts_per_step / workers)
        self.buffer = StalenessBuffer(max_staleness)
        self.stop_requested: Callable[[], bool] = lambda: False  # the trainer's signal flag
        self.capacity = 2 * rollout.prompts_per_step  # as in AsyncRuntime: at most two batches ahead
        self.cursor = 0
        self.counts = {"dropped_stale": 0, "worker_restarts": 0, "lost_jobs": 0}
        self.meter = BusyMeter()
        self.latency = LatencyMeter()
        self.owns_ray = connect(address, num_cpus)
        self.workers: list[ActorSlot] = []
        self.spawned = 0
        try:
            self._check_cpus(workers * worker_threads)
            self._check_gpus()
            self.publish(version, weights)
            self.model = local_path(model)
            self.workers = [self._spawn(i) for i in range(workers)]
        except BaseException:
            self.close()
            raise

    def _check_gpus(self) -> None:
        """Likewise for GPUs: one per rollout actor given a CUDA device."""
        needed = sum(d.startswith("cuda") for d in self.devices)
        have = ray.cluster_resources().get("GPU", 0)
        if needed > have:
            raise UserError(
                f"runtime.worker_devices asks for {needed} GPU actor(s); the Ray cluster has {have:g} GPUs"
            )

    def _check_cpus(self, needed: int) -> None:
        """An actor asking for more CPUs than the cluster has would wait forever, silently."""
        have = ray.cluster_resources().get("CPU", 0)
        if needed > have:
            raise UserError(
                f"runtime.workers x runtime.worker_threads = {needed} CPUs, but the Ray cluster has {have:g} "
                "(a local Ray gets runtime.ray_num_cpus, default all of this machine's)"
            )

    def _spawn(self, index: int) -> ActorSlot:
        self.spawned += 1  # a fresh name each time: `ray list actors` shows which one replaced which
        name = f"asympo-rollout-{self.spawned}"
        device = self.devices[index]
        gpus = 1 if device.startswith("cuda") else 0  # Ray picks the GPU; the actor sees it as cuda:0
        actor = RolloutActor.options(num_cpus=self.threads, num_gpus=gpus, max_restarts=0, name=name).remote(
            self.model,
            self.rollout,
            self.threads,
            self.return_logprobs,
            device,
            self.precision,
            self.lora,
            self.env,
        )
        return ActorSlot(actor)

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """One copy into the object store; the actors get a reference, not the tensors. An actor still
        loading its model gets none: offers queued behind its start would pin every version meanwhile."""
        self.learner_version, self.weights = version, self._put(version, weights)
        self.published_at = time.time() if self.workers else 0.0  # 0: the initial weights, no latency
        for worker in self.workers:
            if worker.ready:
                worker.actor.offer.remote(version, self.weights, self.published_at)

    def _put(self, version: int, weights: dict[str, torch.Tensor]) -> list:
        """[the whole version, the version a delta applies to (or -1), the delta (or None)]: refs boxed in
        a list, so Ray hands them over unfetched."""
        index, buffer = pack_weights(weights)
        boxed = [put_version(index, buffer), -1, None]
        self.counts_bytes["publish_bytes"] = buffer.numel()
        self.counts_bytes["publish_delta_bytes"] = 0
        if self.delta and self.sent is not None and self.sent[1] == index and self.sent[0] != version:
            delta = encode_delta(buffer, self.sent[2])
            if len(delta) < buffer.numel():
                boxed[1:] = [self.sent[0], ray.put((index, delta))]
                self.counts_bytes["publish_delta_bytes"] = len(delta)
        if self.delta:
            self.sent = (version, index, buffer)
        return boxed

    def next_batch(self, step: int, attempt: int = 0) -> tuple[list[Sample], dict[str, float]]:
        # attempt > 0: a further round of the same step (dynamic sampling); the buffer's next groups are fresh
        entered = time.perf_counter()
        while True:
            if self.stop_requested():
                raise StopWaiting
            self._dispatch()
            self.counts["dropped_stale"] += self.buffer.evict_stale(self.learner_version)
            if len(self.buffer) >= self.rollout.prompts_per_step:
                break
            pending = [ref for worker in self.workers for ref in worker.in_flight]
            ready, _ = ray.wait(pending, num_returns=1, timeout=0.5) if pending else ([], [])
            for ref in ready:
                self._receive(ref)
        samples = self.buffer.take(self.rollout.prompts_per_step)
        stats = self.meter.stats(entered, len(self.workers)) | self.latency.stats()
        published = self.counts_bytes if self.delta else {}
        return samples, stats | {"buffer_groups": len(self.buffer), **self.counts, **published}

    def _dispatch(self) -> None:
        """Keep every actor `depth` jobs deep, unless the buffer would overflow its bound."""
        for worker in self.workers:
            while len(worker.in_flight) < self.depth and self._room():
                problems = [next(self.problems) for _ in range(self.job_prompts)]
                seed = job_seed(self.seed, self.cursor)  # the same seeds as the local runtime
                self.cursor += len(problems)
                ref = worker.actor.generate.remote(
                    problems, seed, self.learner_version, self.weights, self.published_at
                )
                worker.in_flight[ref] = Job(problems, seed)

    def _room(self) -> bool:
        pending = sum(len(w.in_flight) for w in self.workers) * self.job_prompts
        return len(self.buffer) + pending + self.job_prompts <= self.capacity

    def _receive(self, ref: ray.ObjectRef) -> None:
        index = next((i for i, w in enumerate(self.workers) if ref in w.in_flight), None)
        if index is None:  # a job of an actor already replaced
            return
        job = self.workers[index].in_flight.pop(ref)
        try:
            groups, busy, latencies = ray.get(ref)
        except ray.exceptions.RayError as e:  # the actor died, or its job raised: replace it, as a crash
            self.counts["lost_jobs"] += 1
            self._replace(index, e)
            return
        self.workers[index].ready = True
        self.meter.record(groups, busy)
        self.latency.add(latencies)
        self.buffer.add_rewarded(job.problems, groups, self.score)

    def _replace(self, index: int, error: Exception) -> None:
        worker = self.workers[index]
        self.counts["worker_restarts"] += 1
        self.counts["lost_jobs"] += len(worker.in_flight)
        ray.kill(worker.actor, no_restart=True)  # a no-op when it is already dead
        if self.counts["worker_restarts"] > self.max_restarts:
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RunAborted(
                f"rollout actors died {self.counts['worker_restarts']} times "
                f"(limit faults.max_worker_restarts={self.max_restarts}); last: {cause}"
            )
        self.workers[index] = self._spawn(index)

    def close(self) -> None:
        """Stop the actors at once (their results are not needed); stop the local Ray this runtime started,
        or leave the cluster it joined. A Ray set up by someone else stays as it was."""
        for worker in self.workers:
            ray.kill(worker.actor, no_restart=True)
        self.workers = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
