"""Which runtime a training config asks for, built with its engines and workers."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.config import TrainConfig
from asympo.data.tasks import Problem
from asympo.envs.episodes import make_episodes
from asympo.envs.load import load_env
from asympo.errors import UserError
from asympo.models.device import CPU_FP32, Placement, engine_copy
from asympo.models.lora import adapter_weights
from asympo.models.weights import publishable_weights
from asympo.objectives import get_objective
from asympo.rollout.hf import HFEngine
from asympo.rollout.openai import OpenAIEngine
from asympo.runtime.base import Runtime
from asympo.runtime.buffer import Scorer
from asympo.runtime.devices import worker_devices
from asympo.runtime.lag import LagRuntime
from asympo.runtime.local_async import AsyncRuntime
from asympo.runtime.remote_async import RemoteAsyncRuntime


def runtime_lag(mode: str, lag: int) -> int:
    """`sync` is generate-then-train with the newest weights, i.e. a lag of exactly 0."""
    return 0 if mode == "sync" else lag


def build_runtime(
    cfg: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    version: int,
    problems: Iterator[Problem],
    cursor: int,
    score: Scorer,
    placement: Placement = CPU_FP32,
) -> Runtime:
    """The runtime for `cfg.runtime.mode`; `problems` starts at the data cursor `cursor`. In-process engines
    get their own copy of the policy on the learner's device, in the placement's dtype."""
    engine_logprobs = cfg.behaviour.compare or cfg.behaviour.source == "engine"
    check_weight_updates(cfg)
    check_lag_switch(cfg)
    check_env(cfg)
    if cfg.runtime.publish == "delta" and cfg.runtime.backend != "ray":
        raise UserError(
            "runtime.publish=delta is for Ray actors (runtime.backend=ray): local workers read each version "
            "from one copy in shared memory, and remote engines reload whole files"
        )
    if cfg.runtime.backend == "ray":
        runtime = build_ray(cfg, model, version, problems, score, engine_logprobs, placement)
        runtime.cursor = cursor
        return runtime
    if cfg.rollout.engine in ("openai", "vllm"):
        runtime = build_remote(cfg, tokenizer, problems, score, engine_logprobs, model, version, placement)
        runtime.cursor = cursor
        return runtime
    if cfg.runtime.mode == "async":
        learner_threads(cfg)
        args = worker_pool_args(cfg, model, version, problems, score, engine_logprobs, placement)
        runtime = AsyncRuntime(*args, env=cfg.env)
    else:
        engine = HFEngine(
            engine_copy(model, placement),
            tokenizer,
            version=version,  # the copy's weights: after a resume, not version 0's (that one is reloaded)
            return_logprobs=engine_logprobs,
            max_batch=cfg.rollout.max_batch,
            inflight_kv=cfg.rollout.inflight_kv,
        )
        lag = runtime_lag(cfg.runtime.mode, cfg.runtime.lag)
        episodes = make_episodes(cfg.env, tokenizer)
        switch_at = cfg.runtime.lag_switch_at
        runtime = LagRuntime(engine, problems, score, cfg.rollout, lag, cfg.seed, episodes, switch_at)
    runtime.cursor = cursor
    return runtime


def check_env(cfg: TrainConfig) -> None:
    """A bad environment name or arguments fail here, before any engine or worker starts."""
    if not cfg.env.name:
        return
    if cfg.env.name.startswith("verifiers:"):
        check_verifiers(cfg)
    else:
        load_env(cfg.env.name, cfg.env.args)  # a bad name or arguments: one line, before anything starts
    if cfg.rollout.overlong_buffer:
        raise UserError(
            "rollout.overlong_buffer with env.name: DAPO's overlong shaping is for one response against "
            "max_new_tokens; an episode's turns each have that cap (set rollout.overlong_buffer=0)"
        )


def check_verifiers(cfg: TrainConfig) -> None:
    """A verifiers environment's episodes run through an OpenAI server on loopback over asympo's engine,
    which sends back the token ids it drew but no log-probs: what needs those is refused here."""
    name = cfg.task.name
    if cfg.rollout.engine != "hf":
        raise UserError(
            f"task.name={name} runs on asympo's engine (rollout.engine=hf), served in-process to the "
            f"environment; rollout.engine={cfg.rollout.engine} is not served that way yet"
        )
    if cfg.rollout.weight_updates == "inflight":
        raise UserError(f"task.name={name}: rollout.weight_updates=inflight is not built for it")
    needs = cfg.behaviour.compare or get_objective(cfg.objective.name).needs_behaviour
    if cfg.behaviour.source == "engine" and needs:
        raise UserError(
            f"task.name={name}: objective {cfg.objective.name} needs behaviour log-probs, which the "
            "environment's server does not send: set behaviour.source=learner or a current-policy objective"
        )


def check_lag_switch(cfg: TrainConfig) -> None:
    """`runtime.lag_switch_at` switches the weights of a lag run's own engine in the middle of a batch."""
    if not cfg.runtime.lag_switch_at:
        return
    if cfg.runtime.mode != "lag" or cfg.runtime.lag == 0:
        raise UserError(
            f"runtime.lag_switch_at needs runtime.mode=lag with runtime.lag > 0 (mode={cfg.runtime.mode}, "
            f"lag={cfg.runtime.lag}): only there is a batch generated by a version older than the newest"
        )
    if cfg.rollout.engine != "hf":
        raise UserError(
            f"runtime.lag_switch_at is built for asympo's engine (rollout.engine=hf), not "
            f"{cfg.rollout.engine}"
        )


def weight_switch_notes(cfg: TrainConfig) -> list[str]:
    """Settings that run but cost learning, said once at the start: learner-scored behaviour log-probs of
    tokens drawn after a weight switch over keys and values the older weights computed (`keep`)."""
    switches = cfg.rollout.weight_updates == "inflight" or (
        cfg.runtime.mode == "lag" and cfg.runtime.lag_switch_at
    )
    needs = get_objective(cfg.objective.name).needs_behaviour
    if not (switches and needs and cfg.behaviour.source == "learner" and cfg.rollout.inflight_kv == "keep"):
        return []
    return [
        "note: with rollout.inflight_kv=keep, a token drawn after a weight switch reads keys and values of "
        "older weights, which no snapshot the learner scores with reproduces (grpo:learner lost 10 points on "
        "the tiny task, docs/results.md); rollout.inflight_kv=recompute or behaviour.source=engine avoids it"
    ]


def check_weight_updates(cfg: TrainConfig) -> None:
    """`rollout.weight_updates=inflight` where it can work: asympo's engine or vLLM in an async runtime.
    Behaviour log-probs come from the engine (each token's from the weights that drew it) or from the
    learner, which scores each token under its own version's snapshot (asympo/recompute.py)."""
    if cfg.rollout.weight_updates != "inflight":
        return
    if cfg.rollout.engine == "openai":
        raise UserError(
            "rollout.weight_updates=inflight needs an engine that loads weights between decode steps; "
            "rollout.engine=openai is a remote server, reloaded between requests: use between_jobs"
        )
    if cfg.rollout.engine == "vllm" and cfg.rollout.inflight_kv != "keep":
        raise UserError(
            f"rollout.weight_updates=inflight with rollout.engine=vllm keeps live sequences' keys and values "
            f"(rollout.inflight_kv=keep); inflight_kv={cfg.rollout.inflight_kv} is built for asympo's engine"
        )
    if cfg.runtime.mode != "async":
        raise UserError(
            f"rollout.weight_updates=inflight needs runtime.mode=async (it is '{cfg.runtime.mode}'): in sync "
            "and lag modes the engine is idle while the learner trains, so nothing arrives in flight"
        )


def learner_threads(cfg: TrainConfig) -> None:
    if cfg.runtime.learner_threads:  # 0 keeps torch's default: a thread per core, shared with the workers
        torch.set_num_threads(cfg.runtime.learner_threads)


def build_ray(
    cfg: TrainConfig,
    model: PreTrainedModel,
    version: int,
    problems: Iterator[Problem],
    score: Scorer,
    engine_logprobs: bool,
    placement: Placement,
):
    """`runtime.backend=ray`: the async runtime with Ray actors as its rollout workers."""
    if cfg.runtime.mode != "async":
        raise UserError(f"runtime.backend=ray needs runtime.mode=async (it is '{cfg.runtime.mode}')")
    if cfg.rollout.engine != "hf":
        raise UserError("runtime.backend=ray runs rollout.engine=hf in its actors")
    from asympo.runtime.ray_backend import RayRuntime  # Ray is an optional extra

    learner_threads(cfg)  # the driver is the learner
    args = worker_pool_args(cfg, model, version, problems, score, engine_logprobs, placement)
    if cfg.lora.rank > 0:  # the actors load the base themselves and take the adapters alone
        args = (args[0], adapter_weights(model), *args[2:])
    address, cpus = cfg.runtime.ray_address, cfg.runtime.ray_num_cpus
    delta = cfg.runtime.publish == "delta"
    return RayRuntime(*args, address=address, num_cpus=cpus, lora=cfg.lora, env=cfg.env, delta=delta)


def worker_pool_args(
    cfg: TrainConfig,
    model: PreTrainedModel,
    version: int,
    problems: Iterator[Problem],
    score: Scorer,
    engine_logprobs: bool,
    placement: Placement,
) -> tuple:
    """The arguments shared by the async runtimes that own their rollout workers (processes, Ray actors):
    the first weights in the engines' dtype, and a device per worker (see asympo.runtime.devices)."""
    rt = cfg.runtime
    remote = cfg.runtime.backend == "ray"
    devices, weights = (
        worker_devices(cfg, placement, model, remote),
        publishable_weights(model, placement.dtype),
    )
    return (
        cfg.model, weights, version, problems, score, cfg.rollout, cfg.seed,
        rt.workers, rt.worker_threads, rt.max_staleness, rt.jobs_per_worker, cfg.faults.max_worker_restarts,
        engine_logprobs, devices, cfg.precision,  # each worker resolves it for its own device
    )  # fmt: skip


def build_remote(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    problems: Iterator[Problem],
    score: Scorer,
    engine_logprobs: bool,
    model: PreTrainedModel | None = None,
    version: int = 0,
    placement: Placement = CPU_FP32,
) -> LagRuntime | RemoteAsyncRuntime:
    """`rollout.engine=openai` or `vllm`: the same runtimes, with rollouts from an engine outside this
    process's torch (a server, or vLLM's own engine process), so `async` needs only a thread to keep it
    busy. vLLM starts from `model`'s weights at `version`, in the placement's dtype."""
    if cfg.rollout.engine == "vllm":
        from asympo.rollout.vllm import VLLMEngine  # the `vllm` extra

        v = cfg.rollout.vllm
        engine = VLLMEngine(
            cfg.model if model is None else model,
            tokenizer,
            version=version,
            return_logprobs=engine_logprobs,
            dtype=placement.dtype,
            seed=cfg.seed,
            kv_cache_gib=v.kv_cache_gib,
            enforce_eager=v.enforce_eager,
            max_model_len=v.max_model_len,
        )
    else:
        engine = openai_engine(cfg, tokenizer, get_objective(cfg.objective.name).needs_behaviour)
    episodes = make_episodes(cfg.env, tokenizer)
    if cfg.runtime.mode != "async":
        lag = runtime_lag(cfg.runtime.mode, cfg.runtime.lag)
        return LagRuntime(engine, problems, score, cfg.rollout, lag, cfg.seed, episodes)
    learner_threads(cfg)  # the server may be on this machine too
    staleness = cfg.runtime.max_staleness
    return RemoteAsyncRuntime(engine, problems, score, cfg.rollout, cfg.seed, staleness, episodes)


def openai_engine(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, needs_behaviour: bool):
    if cfg.behaviour.compare:
        raise UserError("behaviour.compare=true needs engine log-probs; rollout.engine=openai returns none")
    if cfg.behaviour.source == "engine" and needs_behaviour:
        raise UserError(
            f"objective '{cfg.objective.name}' needs behaviour log-probs, which rollout.engine=openai does "
            "not return: set behaviour.source=learner (the learner recomputes them)"
        )
    return OpenAIEngine(cfg.rollout.openai, tokenizer)
