"""`asympo eval`: held-out greedy accuracy, sampled pass@1 and pass@k of any model on the built-in task."""

from __future__ import annotations

from pathlib import Path

from asympo.config import EvalConfig
from asympo.data.tasks import held_out_problems
from asympo.evaluate import greedy_accuracy, sampled_pass_at_k
from asympo.io import atomic_write_text
from asympo.metrics import console
from asympo.models.load import load_policy
from asympo.rollout.base import SamplingConfig
from asympo.rollout.hf import HFEngine


def run_eval(cfg: EvalConfig) -> dict:
    import json

    model, tokenizer = load_policy(cfg.model)
    engine = HFEngine(model, tokenizer)
    problems = held_out_problems(cfg.task)
    with console.status(f"evaluating {len(problems)} held-out problems"):
        result = {"model": cfg.model, "problems": len(problems)}
        result["greedy_accuracy"] = greedy_accuracy(engine, problems, cfg.max_new_tokens)
        sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
        result |= sampled_pass_at_k(engine, problems, cfg.k, sampling, cfg.seed)
    if cfg.json_out:
        atomic_write_text(Path(cfg.json_out), json.dumps(result, indent=2))
    return result
