"""`asympo eval`: pass@1, pass@k, avg@k, boxed-rate, mean length and greedy accuracy of any model on any
task (the built-in arithmetic, a file, a dataset, a reasoning-gym task), single-turn or as an environment's
episodes (`env.name`: success is a reward of at least 1; the environment's info means follow), with a
progress bar; the result also as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from asympo.config import EvalConfig, SamplingConfig
from asympo.data.prompts import Prompter
from asympo.data.source import Task
from asympo.envs.episodes import make_episodes
from asympo.evaluate import greedy_accuracy, sampled_metrics, tally
from asympo.io import atomic_write_text, ensure_writable_dir
from asympo.metrics import progress_bar
from asympo.models.device import for_engine, resolve
from asympo.models.load import load_policy
from asympo.rewards.guard import RewardGuard
from asympo.rollout.hf import HFEngine
from asympo.sft import ensure_tiny


def run(cfg: EvalConfig) -> dict:
    if cfg.json_out:  # an unwritable destination fails now, not after the whole evaluation
        ensure_writable_dir(Path(cfg.json_out).parent)
    ensure_tiny(cfg.model)
    model, tokenizer = load_policy(cfg.model)
    model = for_engine(model, resolve(cfg.device, cfg.precision, model))
    task = Task(cfg.task, Prompter(cfg.prompt, tokenizer))
    problems = task.held_out()
    engine = HFEngine(model, tokenizer, return_logprobs=False, max_batch=cfg.max_batch)
    episodes = make_episodes(cfg.env, tokenizer)  # multi-turn: success, turns
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    result: dict = {"model": cfg.model, "task": cfg.task.name, "problems": len(problems), "k": cfg.k}
    with RewardGuard(cfg.reward, cfg.reward_timeout) as guard, progress_bar(cfg.progress) as bar:
        job = bar.add_task("eval", total=len(problems), status=f"{cfg.k} samples each")
        advance = lambda n: bar.advance(job, n)  # noqa: E731
        counts = tally(
            engine, problems, cfg.k, sampling, cfg.seed, guard.score, advance=advance, episodes=episodes
        )
        result |= sampled_metrics(counts, cfg.k)
        if cfg.greedy:
            bar.update(job, status="greedy")
            greedy = greedy_accuracy(engine, problems, cfg.max_new_tokens, guard.score, episodes)
            result["greedy_accuracy"] = greedy
        result |= {
            "reward_errors": guard.errors,
            "reward_timeouts": guard.timeouts,
            "skipped_rows": task.skipped,
        }
    if cfg.json_out:
        atomic_write_text(Path(cfg.json_out), json.dumps(result, indent=2))
    return result
