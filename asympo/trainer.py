"""The RL loop of `asympo train`, in data-flow order: rollouts, rewards, advantages, learner, weights."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from asympo.batch import make_batch
from asympo.checkpoint import TrainState, load_checkpoint, save_checkpoint
from asympo.config import TrainConfig
from asympo.data.prompts import Prompter
from asympo.data.source import Task
from asympo.distributed import group
from asympo.distributed.learner import ShardedLearner
from asympo.distributed.run import agreed_placement, check_supported, follow
from asympo.envs.episodes import make_episodes
from asympo.errors import UserError
from asympo.evaluate import held_out_accuracy
from asympo.faults import Interrupted, RunAborted, SkipGuard, StopSignal, StopWaiting
from asympo.io import atomic_write_text, ensure_writable_dir
from asympo.learner import Learner
from asympo.metrics import MetricsLog, WandbSettings, console, progress_bar, rollout_metrics, summary_table
from asympo.models.device import engine_copy, resolve
from asympo.models.load import load_policy
from asympo.models.lora import plain_copy
from asympo.models.tying import tied_aliases
from asympo.models.weights import save_model_atomic
from asympo.objectives import advantage_method
from asympo.recompute import BehaviourRecompute
from asympo.rewards.guard import RewardGuard
from asympo.rewards.shaping import filter_truncated
from asympo.rollout.hf import HFEngine
from asympo.runtime import build_runtime, weight_switch_notes
from asympo.runtime.dynamic import step_batch
from asympo.sft import ensure_tiny
from asympo.snapshots import SnapshotStore


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """A whole run in this process (one learner rank)."""
    return Trainer(cfg, quiet).run()


def train_ranks(cfg: TrainConfig, quiet: bool = False) -> dict:
    """This rank's part of a data-parallel run (torchrun or Ray ranks): rank 0 runs the Trainer with a
    ShardedLearner and returns the run's result, the others follow it and return {}."""
    check_supported(cfg)
    group.check_processes(cfg.learner.processes)
    group.start(torch.device(group.local_device(cfg.device)))
    try:
        if group.rank() == 0:
            return Trainer(cfg, quiet, sharded=True).run()
        follow(cfg)
        return {}
    finally:
        group.stop()


class Trainer:
    """One `asympo train` run: set-up (or resume), the loop, checkpoints, the final evaluation."""

    def __init__(self, cfg: TrainConfig, quiet: bool = False, sharded: bool = False):
        """`sharded`: rank 0 of a data-parallel learner (asympo.distributed), inside its process group."""
        self.cfg, self.out, self.sharded = cfg, ensure_writable_dir(cfg.out), sharded
        self.say = (lambda *_: None) if quiet else console.print
        torch.manual_seed(cfg.seed)
        ensure_tiny(cfg.model)
        self.model, self.tokenizer = load_policy(cfg.model)
        if self.sharded:
            self.placement = agreed_placement(cfg, self.model)
            # the learner's model is split across ranks: engines, evaluation and final/ use a whole copy
            self.plain = copy.deepcopy(self.model)
            learner_class = ShardedLearner
        else:
            self.placement = resolve(cfg.device, cfg.precision, self.model)
            self.plain, learner_class = self.model, Learner
        temperature = cfg.rollout.temperature or 1.0
        self.learner = learner_class(
            self.model,
            cfg.objective,
            cfg.optim,
            temperature,
            cfg.env.max_tokens if cfg.env.name else cfg.rollout.max_new_tokens,  # the longest response
            self.placement,
            lora=cfg.lora,
        )
        self.state, history, self.resumed = self.restore()
        if self.sharded and self.resumed:  # the whole copy takes the restored weights before engines copy it
            load_plain(self.plain, self.learner.weights(torch.float32))
        atomic_write_text(self.out / "config.json", cfg.model_dump_json(indent=2))
        self.task = Task(cfg.task, Prompter(cfg.prompt, self.tokenizer))  # bad data fails before any
        self.held_out = self.task.held_out()  # process starts
        self.validation = self.task.validation()  # empty unless task.validation_size > 0
        if self.task.skipped:
            self.say(f"skipped {self.task.skipped} bad rows of {cfg.task.name}")
        self.rewards = RewardGuard(cfg.reward, cfg.faults.reward_timeout)
        self.episodes = make_episodes(cfg.env, self.tokenizer)  # held-out episodes
        problems = self.task.train(cfg.seed, start=self.state.cursor)
        self.runtime = build_runtime(
            cfg,
            self.plain,
            self.tokenizer,
            self.learner.version,
            problems,
            self.state.cursor,
            self.rewards.score,
            self.placement,
        )
        self.recompute = None
        if cfg.behaviour.source == "learner":
            self.recompute = behaviour_recompute(
                cfg, self.learner, self.plain, self.tokenizer.pad_token_id, self.runtime.lag, self.out
            )
        for version, weights in history:  # the lag runtime's older versions, so it continues exactly
            self.publish(version, weights)
        self.publish(self.learner.version)
        self.skips = SkipGuard(cfg.faults.max_skipped_steps)
        self.skips.consecutive = int(self.state.counters.get("consecutive_skips", 0))
        self.runtime.counts.update(self.state.counters.get("runtime", {}))
        self.eval_engine = self.make_eval_engine()

    def make_eval_engine(self) -> HFEngine:
        """Decodes `eval_max_batch` at once (default: the rollout's). In float32 the evaluation engine
        shares the learner's weights. In bf16 it needs bf16 weights: the sync/lag runtime's engine when there
        is one and it decodes as many at once (it reloads its own version afterwards), else a copy. A sharded
        learner's model cannot generate alone: the whole copy evaluates, loading each version."""
        batch = self.cfg.eval_max_batch or self.cfg.rollout.max_batch
        if not self.placement.bf16:
            if self.sharded:
                return HFEngine(self.plain, self.tokenizer, version=-1, max_batch=batch)
            return HFEngine(self.model, self.tokenizer, max_batch=batch)
        if self.runtime.in_process_engine is not None and batch == self.cfg.rollout.max_batch:
            return self.runtime.in_process_engine
        model = engine_copy(self.plain, self.placement)
        return HFEngine(model, self.tokenizer, version=-1, max_batch=batch)

    def restore(self) -> tuple[TrainState, list, bool]:
        fresh = TrainState(step=0, version=0, skipped_steps=0, cursor=0)
        if not self.cfg.resume:
            return fresh, [], False
        learner = self.learner
        shards = learner.load_shards if self.sharded else None
        root = self.out / "checkpoints"
        loaded = load_checkpoint(root, self.model, learner.optimizer, learner.scheduler, shards)
        if loaded is None:
            self.say("resume=true but no checkpoint yet: starting fresh")
            return fresh, [], False
        state, history = loaded
        if state.step > self.cfg.steps:
            raise UserError(f"the checkpoint is at step {state.step}, past steps={self.cfg.steps}")
        learner.version, learner.skipped_steps = state.version, state.skipped_steps
        self.say(f"resuming at step {state.step}")
        return state, history, True

    def publish(self, version: int, weights: dict | None = None) -> None:
        """Send a version to the runtime (and the recompute store); `weights` None: the learner's newest,
        gathered only if something takes them (Ray actors under LoRA take the adapters alone)."""
        adapters_only = self.runtime.adapters_only and version == self.learner.version
        if weights is None and not adapters_only:
            weights = self.learner.weights()
        self.runtime.publish(version, self.learner.adapters() if adapters_only else weights)
        if (
            self.recompute is not None
        ):  # the master weights (float32), so that an on-policy ratio is 1 in bf16
            current = self.placement.bf16 and version == self.learner.version
            if current or weights is None:
                weights = self.learner.weights(torch.float32 if current else None)
            self.recompute.store.put(version, weights)

    def evaluate(self, problems: list | None = None) -> dict[str, float]:
        """Held-out accuracy on the test set, or on `problems` (the validation set)."""
        cfg, engine = self.cfg, self.eval_engine
        self.model.eval()
        if engine.model is not self.model and engine.version != self.learner.version:
            engine.load_weights(self.learner.weights(), self.learner.version)
        problems = self.held_out if problems is None else problems
        score = self.rewards.score
        return held_out_accuracy(
            engine, problems, cfg.eval_samples, cfg.rollout, cfg.seed, score, episodes=self.episodes
        )

    def checkpoint(self, step: int) -> Path:
        learner, state = self.learner, self.state
        state.step, state.version, state.skipped_steps = step, learner.version, learner.skipped_steps
        state.cursor = self.runtime.cursor
        state.counters |= {"consecutive_skips": self.skips.consecutive}
        state.counters["runtime"] = dict(self.runtime.counts)
        kept = list(self.runtime.history)
        shards = learner.save_shards if self.sharded else None
        return save_checkpoint(
            self.out / "checkpoints", state, self.model, learner.optimizer, learner.scheduler, kept, 2, shards
        )

    def run(self) -> dict:
        cfg = self.cfg
        self.say(f"device: {self.placement.describe()}")  # once set-up has passed: bad input stays one line
        for note in weight_switch_notes(cfg):
            self.say(note)
        finished = False
        try:
            try:
                before = self.state.counters.get("before") or self.evaluate()
                self.state.counters["before"] = before
                self.say(
                    f"held-out accuracy before: {before['accuracy']:.1%} sampled pass@1, "
                    f"{before['greedy_accuracy']:.1%} greedy  ({cfg.objective.name}, {cfg.runtime.mode})"
                )
                self.log = MetricsLog(
                    self.out, cfg.tensorboard, self.state.step if self.resumed else None, wandb_settings(cfg)
                )
                self.start = time.perf_counter()
                self.loop()
                if cfg.checkpoint_every:
                    self.checkpoint(cfg.steps)
            finally:
                self.runtime.close()
            result = self.finish(before)
            finished = True
            return result
        finally:
            self.rewards.close()
            if self.sharded:
                self.learner.release(part=finished)

    def loop(self) -> None:
        cfg, learner, done = self.cfg, self.learner, self.state.step  # done: where a checkpoint resumes
        try:
            with StopSignal() as stop, progress_bar(cfg.progress) as bar:
                task = bar.add_task("train", total=cfg.steps, completed=done, status="")
                self.runtime.stop_requested = lambda: stop.received is not None
                for step in range(self.state.step, cfg.steps):
                    try:
                        samples, rollout_stats = step_batch(self.runtime, step, cfg.rollout)
                    except StopWaiting:
                        raise Interrupted(stop.received, done, self.checkpoint(done)) from None
                    if self.recompute is not None:
                        samples, recompute_stats = self.recompute.apply(samples)
                        rollout_stats |= recompute_stats
                    batch = make_batch(samples, self.tokenizer.pad_token_id, advantage_method(cfg.objective))
                    if cfg.rollout.overlong_filter:  # truncated responses leave the loss, after advantages
                        rollout_stats["truncated_filtered"] = filter_truncated(batch, samples)
                    # lag mode keeps every update's version: a rollout k versions back may come from any
                    keep = self.publish if self.runtime.keeps_every_version else None
                    stats = (
                        rollout_metrics(samples, learner.version)
                        | rollout_stats
                        | learner.updates(batch, keep)
                    )
                    self.publish(learner.version)
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                        stats |= {f"test_{k}": v for k, v in self.evaluate().items()}
                    stats |= self.reward_counts() | {"version": learner.version, "elapsed": self.elapsed()}
                    self.log.log(step, stats)
                    done = step + 1
                    bar.update(task, advance=1, status=f"reward {stats['reward']:.2f}")
                    self.skips.update(learner.skipped_steps > self.state.skipped_steps)
                    self.state.skipped_steps = learner.skipped_steps
                    if stop.received:
                        raise Interrupted(stop.received, done, self.checkpoint(done))
                    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                        self.checkpoint(done)
        except RunAborted as e:
            raise RunAborted(f"{e}; checkpoint {self.checkpoint(done)}") from None

    def finish(self, before: dict[str, float]) -> dict:
        after = self.evaluate()
        final = {f"test_{k}": v for k, v in after.items()} | {"version": self.learner.version}
        validation = self.evaluate(self.validation) if self.validation else {}
        final |= {f"validation_{k}": v for k, v in validation.items()}
        self.log.log(self.cfg.steps, final)
        self.log.close()
        if self.cfg.save_model:
            model = self.model if self.learner.peft is None else self.learner.peft  # LoRA: see models.lora
            if self.sharded:  # final/ is consolidated: the whole copy with the last weights
                model = load_plain(self.plain, self.learner.weights(torch.float32))
            save_model_atomic(model, self.tokenizer, self.out / "final")
        result = {
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "greedy_accuracy_before": before["greedy_accuracy"],
            "greedy_accuracy_after": after["greedy_accuracy"],
            **({"validation_accuracy_after": validation["accuracy"]} if validation else {}),
            **{
                f"{k}_{when}": m[k]
                for k in after
                if k.startswith("env_")
                for when, m in (("before", before), ("after", after))
                if k in m
            },
            "steps": self.cfg.steps,
            "version": self.learner.version,
            "skipped_steps": self.learner.skipped_steps,
            "seconds": round(self.elapsed(), 1),
            **self.reward_counts(),
        }
        atomic_write_text(self.out / "result.json", json.dumps(result, indent=2))
        self.say(summary(self.cfg, result, self.out))
        return result

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reward_counts(self) -> dict[str, int]:
        return {"reward_errors": self.rewards.errors, "reward_timeouts": self.rewards.timeouts}


def wandb_settings(cfg: TrainConfig) -> WandbSettings | None:
    if not cfg.wandb:
        return None
    return WandbSettings(cfg.wandb_project, cfg.wandb_run_name, cfg.wandb_mode, cfg.model_dump(mode="json"))


def load_plain(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load published weights (the tied alias left out) into a whole model; any other gap is an error."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if set(missing) - set(tied_aliases(model.state_dict())) or unexpected:
        raise RuntimeError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model


def behaviour_recompute(
    cfg: TrainConfig, learner: Learner, model: torch.nn.Module, pad_id: int, lag: int, out
) -> BehaviourRecompute:
    """Snapshots of the last lag + 1 versions: exactly the ones a trained sample can come from. They are
    scored on the learner's device and in its precision, so a ratio compares like with like. `model`: a
    whole (unsharded) model to copy."""
    store = SnapshotStore(lag + 1, cfg.behaviour.snapshots, out / "snapshots")
    temperature = cfg.rollout.temperature or 1.0
    scratch = plain_copy(model)  # LoRA: the plain architecture, which loads merged weights
    return BehaviourRecompute(scratch, store, pad_id, temperature, learner.placement)


def is_env_after(key: str, result: dict) -> bool:
    """An environment's held-out info mean, measured before and after (`env_used_tool_after`)."""
    return key.startswith("env_") and key.endswith("_after") and key[:-6] + "_before" in result


def summary(cfg: TrainConfig, result: dict, out: Path):
    def change(key: str) -> str:
        before, after = result[f"{key}_before"], result[f"{key}_after"]
        return f"{before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points)"

    return summary_table(
        f"asympo train: {cfg.objective.name}",
        [
            ("held-out accuracy (sampled pass@1)", change("accuracy")),
            ("held-out greedy accuracy", change("greedy_accuracy")),
            *[
                (
                    f"held-out {key[4:-6]} per episode",
                    f"{result[key[:-6] + '_before']:.2f} -> {result[key]:.2f}",
                )
                for key in result
                if is_env_after(key, result)
            ],
            ("optimiser steps", str(result["version"])),
            ("skipped (non-finite) steps", str(result["skipped_steps"])),
            ("reward errors / timeouts", f"{result['reward_errors']} / {result['reward_timeouts']}"),
            ("training time", f"{result['seconds']:.0f} s"),
            ("output", str(out)),
        ],
    )
