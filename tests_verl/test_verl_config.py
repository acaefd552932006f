"""The fully-async example in docs/integrations.md composes with verl's own Hydra config."""

from __future__ import annotations

import os
import re
from pathlib import Path

import verl
from hydra import compose, initialize_config_dir
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config.actor import PolicyLossConfig

DOC = (Path(__file__).parents[1] / "docs" / "integrations.md").read_text()


def example_overrides() -> list[str]:
    block = re.search(
        r"```bash\npython -m verl\.experimental\.fully_async_policy\.fully_async_main \\\n(.*?)```", DOC, re.S
    )
    assert block, "the fully-async example is missing from docs/integrations.md"
    return [tok for line in block.group(1).splitlines() for tok in line.strip(" \\").split()]


def test_the_documented_example_composes():
    overrides = example_overrides()
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=asympo" in overrides
    config_dir = os.path.join(os.path.dirname(verl.__file__), "experimental/fully_async_policy/config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="fully_async_ppo_trainer", overrides=overrides)
    actor = cfg.actor_rollout_ref.actor
    assert actor.loss_agg_mode == "seq-mean-token-mean" and not actor.use_kl_loss
    assert omega_conf_to_dataclass(actor.policy_loss, PolicyLossConfig).loss_mode == "asympo"
    assert cfg.algorithm.rollout_correction.get("rollout_is") is None  # asympo refuses IS weights
