"""`asympo train`: the RL loop, in data-flow order: rollouts, rewards, advantages, learner, weights."""

from __future__ import annotations

import copy
import json
import time

import torch

from asympo.batch import make_batch
from asympo.config import TrainConfig
from asympo.data.tasks import held_out_problems, train_stream
from asympo.evaluate import held_out_accuracy
from asympo.io import atomic_write_text, ensure_writable_dir, save_model_atomic
from asympo.learner import Learner
from asympo.metrics import MetricsLog, console, progress_bar, rollout_metrics, summary_table
from asympo.models.load import load_policy
from asympo.objectives import advantage_method
from asympo.recompute import BehaviourRecompute
from asympo.rewards.exact import exact_match
from asympo.rollout.hf import HFEngine
from asympo.runtime import LagRuntime, runtime_lag
from asympo.snapshots import SnapshotStore


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    out = ensure_writable_dir(cfg.out)
    atomic_write_text(out / "config.json", cfg.model_dump_json(indent=2))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model)
    learner = Learner(
        model, cfg.objective, cfg.optim, cfg.rollout.temperature or 1.0, cfg.rollout.max_new_tokens
    )
    from_learner = cfg.behaviour.source == "learner"
    rollout_engine = HFEngine(
        copy.deepcopy(model), tokenizer, return_logprobs=cfg.behaviour.compare or not from_learner
    )
    eval_engine = HFEngine(model, tokenizer)  # shares the learner's weights: always the newest version
    held_out = held_out_problems(cfg.task)
    runtime = LagRuntime(
        rollout_engine,
        train_stream(cfg.task, cfg.seed),
        exact_match,
        cfg.rollout,
        runtime_lag(cfg.runtime.mode, cfg.runtime.lag),
        cfg.seed,
    )
    recompute = (
        behaviour_recompute(cfg, model, tokenizer.pad_token_id, runtime.lag, out) if from_learner else None
    )
    publish(learner, runtime, recompute)
    advantage = advantage_method(cfg.objective)
    evaluate = lambda: held_out_accuracy(eval_engine, held_out, cfg.eval_samples, cfg.rollout, cfg.seed)  # noqa: E731

    before, start, log = evaluate(), time.perf_counter(), MetricsLog(out, cfg.tensorboard)
    say = (lambda *_: None) if quiet else console.print
    say(
        f"held-out accuracy before: {before['accuracy']:.1%} sampled pass@1, "
        f"{before['greedy_accuracy']:.1%} greedy"
        f"  ({cfg.objective.name}, {cfg.runtime.mode} k={runtime.lag})"
    )
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("train", total=cfg.steps, status="")
        for step in range(cfg.steps):
            samples, rollout_stats = runtime.next_batch(step)
            if recompute is not None:
                samples, recompute_stats = recompute.apply(samples)
                rollout_stats |= recompute_stats
            batch = make_batch(samples, tokenizer.pad_token_id, advantage)
            stats = rollout_metrics(samples, learner.version) | rollout_stats | learner.step(batch)
            publish(learner, runtime, recompute)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                stats |= {f"test_{k}": v for k, v in evaluate().items()}
            stats.update(
                version=learner.version,
                reward_errors=runtime.reward_errors,
                elapsed=time.perf_counter() - start,
            )
            log.log(step, stats)
            ratio = stats.get("nll_ratio", float("nan"))
            bar.update(task, advance=1, status=f"reward {stats['reward']:.2f} nll+/- {ratio:.2f}")
    after = evaluate()
    log.log(cfg.steps, {f"test_{k}": v for k, v in after.items()} | {"version": learner.version})
    log.close()
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
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    say(
        summary_table(
            f"asympo train: {cfg.objective.name}",
            [
                ("held-out accuracy (sampled pass@1)", _change(before["accuracy"], after["accuracy"])),
                ("held-out greedy accuracy", _change(before["greedy_accuracy"], after["greedy_accuracy"])),
                ("optimiser steps", str(learner.version)),
                ("skipped (non-finite) steps", str(learner.skipped_steps)),
                ("training time", f"{result['seconds']:.0f} s"),
                ("output", str(out)),
            ],
        )
    )
    return result


def publish(learner: Learner, runtime: LagRuntime, recompute: BehaviourRecompute | None) -> None:
    weights = learner.weights()
    runtime.publish(learner.version, weights)
    if recompute is not None:
        recompute.store.put(learner.version, weights)


def behaviour_recompute(cfg: TrainConfig, model, pad_id: int, lag: int, out) -> BehaviourRecompute:
    """Snapshots of the last lag + 1 versions: exactly the ones the runtime can still generate from."""
    store = SnapshotStore(lag + 1, cfg.behaviour.snapshots, out / "snapshots")
    return BehaviourRecompute(copy.deepcopy(model), store, pad_id, cfg.rollout.temperature or 1.0)


def _change(before: float, after: float) -> str:
    return f"{before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points)"
