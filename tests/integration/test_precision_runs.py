"""bf16 and devices in real runs: asking for CUDA where there is none is a one-line error from the CLI, a
bf16 lag run trains and evaluates with bf16 engines, and the learner's recompute gives ratio 1 on policy
under bf16. The learner, engines, tolerances and placement rules: tests/unit/test_precision.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from asympo.config import TrainConfig, build_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_train_on_a_missing_cuda_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "asympo", "train", "device=cuda", f"out={tmp_path}", "steps=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("asympo: error: device=cuda")


def test_a_bf16_lag_run_trains_and_evaluates_with_bf16_engines(tmp_path):
    from asympo.trainer import Trainer

    cfg = build_config(
        TrainConfig,
        overrides=[
            "precision=bf16", "device=cpu", "runtime.mode=lag", "steps=3", "eval_every=2", "eval_samples=1",
            "task.test_size=8", "rollout.prompts_per_step=4", "rollout.group_size=4", f"out={tmp_path}",
            "progress=false", "save_model=false", "checkpoint_every=0",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    assert trainer.placement.bf16
    assert trainer.eval_engine is trainer.runtime.engine  # one bf16 copy serves rollouts and evaluation
    assert next(trainer.runtime.engine.model.parameters()).dtype == torch.bfloat16
    result = trainer.run()
    assert result["version"] == 3 and 0 <= result["accuracy_after"] <= 1
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_bf16_behaviour_recomputed_by_the_learner_gives_ratio_one_on_policy(tmp_path):
    """The recompute scores each version with the float32 master weights under the learner's autocast, so
    on-policy its log-probs equal the learner's: bf16 snapshots would leave a gap of ~0.02 per token."""
    import json

    from asympo.trainer import Trainer

    cfg = build_config(
        TrainConfig,
        overrides=[
            "precision=bf16", "device=cpu", "runtime.mode=sync", "objective=grpo", "behaviour.source=learner",
            "steps=2", "eval_every=0", "eval_samples=1", "task.test_size=8", "rollout.prompts_per_step=4",
            "rollout.group_size=4", f"out={tmp_path}", "progress=false", "save_model=false",
            "checkpoint_every=0",
        ],
    )  # fmt: skip
    Trainer(cfg, quiet=True).run()
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kls = [m["behaviour_kl"] for m in steps if "behaviour_kl" in m]
    assert len(kls) == 2 and all(abs(kl) < 1e-6 for kl in kls)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_decodes_eval_max_batch_at_once_whatever_the_rollout_batch(tmp_path, precision):
    """A generation-bound study decodes 2 at a time; its held-out evaluation need not."""
    from asympo.trainer import Trainer

    cfg = build_config(
        TrainConfig,
        overrides=[
            f"precision={precision}", "device=cpu", "runtime.mode=lag", "steps=1", "eval_every=0",
            "eval_samples=2", "task.test_size=8", "rollout.prompts_per_step=4", "rollout.group_size=2",
            "rollout.max_batch=2", "eval_max_batch=16", f"out={tmp_path}", "progress=false",
            "save_model=false", "checkpoint_every=0",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    assert trainer.runtime.engine.max_batch == 2 and trainer.eval_engine.max_batch == 16
    assert trainer.eval_engine is not trainer.runtime.engine
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert next(trainer.eval_engine.model.parameters()).dtype == dtype
    result = trainer.run()
    assert 0 <= result["accuracy_before"] <= 1 and 0 <= result["accuracy_after"] <= 1
