"""`asympo train`: the RL loop, in data-flow order: rollouts, rewards, advantages, learner, weights."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from asympo.batch import make_batch
from asympo.checkpoint import TrainState, load_checkpoint, save_checkpoint
from asympo.config import TrainConfig
from asympo.data.tasks import held_out_problems
from asympo.evaluate import held_out_accuracy
from asympo.faults import Interrupted, RunAborted, SkipGuard, StopSignal
from asympo.io import atomic_write_text, ensure_writable_dir, save_model_atomic
from asympo.learner import Learner
from asympo.metrics import MetricsLog, console, progress_bar, rollout_metrics, summary_table
from asympo.models.load import load_policy
from asympo.objectives import advantage_method
from asympo.recompute import BehaviourRecompute
from asympo.rewards.guard import RewardGuard
from asympo.rollout.hf import HFEngine
from asympo.runtime import LagRuntime, Runtime, build_runtime
from asympo.snapshots import SnapshotStore


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    out = ensure_writable_dir(cfg.out)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model)
    temperature = cfg.rollout.temperature or 1.0
    learner = Learner(model, cfg.objective, cfg.optim, temperature, cfg.rollout.max_new_tokens)
    resumed = (
        load_checkpoint(out / "checkpoints", model, learner.optimizer, learner.scheduler)
        if cfg.resume
        else None
    )
    state, history = resumed or (TrainState(step=0, version=0, skipped_steps=0, cursor=0), [])
    learner.version, learner.skipped_steps = state.version, state.skipped_steps
    atomic_write_text(out / "config.json", cfg.model_dump_json(indent=2))
    say = (lambda *_: None) if quiet else console.print
    if cfg.resume:
        say(
            f"resuming at step {state.step}"
            if resumed
            else "resume=true but no checkpoint yet: starting fresh"
        )

    rewards = RewardGuard(cfg.reward, cfg.faults.reward_timeout)
    runtime = build_runtime(cfg, model, tokenizer, learner.version, state.cursor, rewards.score)
    recompute = (
        behaviour_recompute(cfg, model, tokenizer.pad_token_id, runtime.lag, out)
        if cfg.behaviour.source == "learner"
        else None
    )
    for version, weights in history:  # the lag runtime's older versions, so it continues exactly
        publish(version, weights, runtime, recompute)
    publish(learner.version, learner.weights(), runtime, recompute)
    advantage, skips = advantage_method(cfg.objective), SkipGuard(cfg.faults.max_skipped_steps)
    eval_engine = HFEngine(model, tokenizer)  # shares the learner's weights: always the newest version
    held_out = held_out_problems(cfg.task)
    evaluate = lambda: held_out_accuracy(eval_engine, held_out, cfg.eval_samples, cfg.rollout, cfg.seed)  # noqa: E731

    before = state.counters.get("before") or evaluate()
    state.counters["before"] = before
    say(
        f"held-out accuracy before: {before['accuracy']:.1%} sampled pass@1, "
        f"{before['greedy_accuracy']:.1%} greedy  ({cfg.objective.name}, {cfg.runtime.mode})"
    )
    log, start = (
        MetricsLog(out, cfg.tensorboard, resume_step=state.step if resumed else None),
        time.perf_counter(),
    )

    def checkpoint(step: int) -> Path:
        state.step, state.version, state.skipped_steps = step, learner.version, learner.skipped_steps
        state.cursor = runtime.cursor
        kept = list(runtime.history) if isinstance(runtime, LagRuntime) else []
        return save_checkpoint(out / "checkpoints", state, model, learner.optimizer, learner.scheduler, kept)

    done = state.step  # steps completed: where a checkpoint taken now would resume
    try:
        with StopSignal() as stop, progress_bar(cfg.progress) as bar:
            task = bar.add_task("train", total=cfg.steps, completed=done, status="")
            for step in range(state.step, cfg.steps):
                samples, rollout_stats = runtime.next_batch(step)
                if recompute is not None:
                    samples, recompute_stats = recompute.apply(samples)
                    rollout_stats |= recompute_stats
                batch = make_batch(samples, tokenizer.pad_token_id, advantage)
                stats = rollout_metrics(samples, learner.version) | rollout_stats | learner.step(batch)
                publish(learner.version, learner.weights(), runtime, recompute)
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    stats |= {f"test_{k}": v for k, v in evaluate().items()}
                stats |= reward_counts(rewards) | {
                    "version": learner.version,
                    "elapsed": time.perf_counter() - start,
                }
                log.log(step, stats)
                done = step + 1
                bar.update(task, advance=1, status=f"reward {stats['reward']:.2f}")
                skips.update(stats["skipped_steps"] > state.skipped_steps)
                state.skipped_steps = learner.skipped_steps
                if stop.received:
                    raise Interrupted(stop.received, done, checkpoint(done))
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    checkpoint(done)
    except RunAborted as e:
        raise RunAborted(f"{e}; checkpoint {checkpoint(done)}") from None
    finally:
        runtime.close()
        rewards.close()

    after = evaluate()
    log.log(cfg.steps, {f"test_{k}": v for k, v in after.items()} | {"version": learner.version})
    log.close()
    if cfg.checkpoint_every:
        checkpoint(cfg.steps)
    if cfg.save_model:
        save_model_atomic(model, tokenizer, out / "final")
    result = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "greedy_accuracy_before": before["greedy_accuracy"],
        "greedy_accuracy_after": after["greedy_accuracy"],
        "steps": cfg.steps,
        "version": learner.version,
        "skipped_steps": learner.skipped_steps,
        "seconds": round(time.perf_counter() - start, 1),
        **reward_counts(rewards),
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    say(summary(cfg, result, out))
    return result


def publish(version: int, weights: dict, runtime: Runtime, recompute: BehaviourRecompute | None) -> None:
    runtime.publish(version, weights)
    if recompute is not None:
        recompute.store.put(version, weights)


def behaviour_recompute(cfg: TrainConfig, model, pad_id: int, lag: int, out) -> BehaviourRecompute:
    """Snapshots of the last lag + 1 versions: exactly the ones a trained sample can come from."""
    store = SnapshotStore(lag + 1, cfg.behaviour.snapshots, out / "snapshots")
    return BehaviourRecompute(copy.deepcopy(model), store, pad_id, cfg.rollout.temperature or 1.0)


def reward_counts(rewards: RewardGuard) -> dict[str, int]:
    return {"reward_errors": rewards.errors, "reward_timeouts": rewards.timeouts}


def summary(cfg: TrainConfig, result: dict, out: Path):
    def change(key: str) -> str:
        before, after = result[f"{key}_before"], result[f"{key}_after"]
        return f"{before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points)"

    return summary_table(
        f"asympo train: {cfg.objective.name}",
        [
            ("held-out accuracy (sampled pass@1)", change("accuracy")),
            ("held-out greedy accuracy", change("greedy_accuracy")),
            ("optimiser steps", str(result["version"])),
            ("skipped (non-finite) steps", str(result["skipped_steps"])),
            ("reward errors / timeouts", f"{result['reward_errors']} / {result['reward_timeouts']}"),
            ("training time", f"{result['seconds']:.0f} s"),
            ("output", str(out)),
        ],
    )
