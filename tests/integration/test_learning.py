"""End to end: the default recipe (tiny warm start, asympo, lag 2) really learns on the built-in task.

A shortened default run, in-process. Seeded, so it is repeatable on one machine; the margin leaves room
for the float differences between machines (the full default run gains ~20 points).
"""

from __future__ import annotations

from asympo.config import TrainConfig, build_config
from asympo.trainer import train


def test_default_recipe_raises_held_out_accuracy(tmp_path):
    cfg = build_config(TrainConfig, None, ["steps=80", "eval_every=0", "progress=false", f"out={tmp_path}"])
    result = train(cfg)
    assert result["version"] == 80 and result["skipped_steps"] == 0
    assert result["accuracy_after"] >= result["accuracy_before"] + 0.05, result
