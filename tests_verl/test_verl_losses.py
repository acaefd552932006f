"""asympo's objectives registered as verl policy losses agree with asympo.objectives.compute_loss."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, get_policy_loss_fn
from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig

import asympo.integrations.verl as av
from asympo.config import ObjectiveConfig
from asympo.objectives import LossInputs, ObjectiveError, compute_loss
from asympo.objectives.current import asympo_weights

MODES = ("asympo", "spo", "spo_pos", "pg")
AGG = {
    "seq-mean-token-mean": "response",
    "token-mean": "token",
    "seq-mean-token-sum-norm": "constant",
    "seq-mean-token-sum": "constant",
}


def actor_config(loss_mode: str = "asympo", **global_batch_info) -> FSDPActorConfig:
    cfg = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_mini_batch_size=4,
        ppo_micro_batch_size_per_gpu=2,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )
    cfg.global_batch_info.update(global_batch_info)
    return cfg


def batch(seed: int = 0, b: int = 6, t: int = 7):
    """verl-shaped tensors: token log-probs, a right-padded mask, outcome advantages broadcast over tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2][:b])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv = adv - adv.mean()
    old = -torch.rand(b, t, generator=g, dtype=torch.float64)
    return logits, mask, adv, old


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.logsigmoid(logits) * 0.8  # a differentiable, negative stand-in


def test_entry_point_registers_the_losses_in_a_fresh_process():
    """`import verl` alone (as every Ray worker does) loads asympo's `verl.plugins` entry point."""
    code = "import verl.trainer.ppo.core_algos as c; print(sorted(c.POLICY_LOSS_REGISTRY))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(f"'{m}'" in out for m in MODES)


def test_without_plugins_the_external_modules_variable_registers_them():
    code = "import verl.trainer.ppo.core_algos as c; print(sorted(c.POLICY_LOSS_REGISTRY))"
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "'asympo'" not in off.stdout  # so the mechanism, not an accident, is what registers them
    env["VERL_USE_EXTERNAL_MODULES"] = "asympo.integrations.verl"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert all(f"'{m}'" in on.stdout for m in MODES)


def test_model_external_lib_registers_them():
    """actor_rollout_ref.model.external_lib is imported when verl builds the model config in a worker."""
    code = (
        "import verl.trainer.ppo.core_algos as c\n"
        "from verl.utils.import_utils import import_external_libs\n"
        "assert 'asympo' not in c.POLICY_LOSS_REGISTRY\n"
        "import_external_libs('asympo.integrations.verl')\n"
        "print(sorted(c.POLICY_LOSS_REGISTRY))"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert all(f"'{m}'" in out.stdout for m in MODES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", list(AGG))
@pytest.mark.parametrize("global_info", [False, True])
def test_matches_compute_loss_in_value_and_gradient(mode, agg, global_info):
    logits, mask, adv, old = batch()
    info = {}
    if global_info:  # rank 0 of 2, its micro-batch is part of a larger global batch
        info = {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 20, "loss_scale_factor": 9}
    cfg = actor_config(mode, **info)

    x1 = logits.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(mode)(
        old_log_prob=old,
        log_prob=log_probs(x1),
        advantages=adv[:, None] * mask,
        response_mask=mask.float(),
        loss_agg_mode=agg,
        config=cfg,
    )
    loss.backward()

    x2 = logits.clone().requires_grad_()
    max_len = {"seq-mean-token-sum": 1, "seq-mean-token-sum-norm": 9 if global_info else mask.shape[1]}
    inputs = LossInputs(
        logprobs=log_probs(x2),
        mask=mask,
        advantages=adv,
        group_ids=torch.arange(len(adv)),
        behaviour_logprobs=old,
        total_responses=10 if global_info else None,
        total_tokens=25 if global_info else None,
        max_len=max_len.get(agg),
    )
    ref, ref_metrics = compute_loss(inputs, ObjectiveConfig(name=mode, aggregation=AGG[agg]))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert metrics == {f"actor/asympo/{k}": v for k, v in ref_metrics.items()}

    # and the aggregation is verl's own: verl's agg_loss over the same token loss gives the same value
    x3 = logits.clone().requires_grad_()
    lp = log_probs(x3)
    weight = {
        "pg": adv,
        "spo": torch.where(adv >= 0, adv, 0.5 * adv),
        "spo_pos": torch.where(adv >= 0, adv, 0.1 * adv),
    }.get(mode)
    if weight is None:
        weight = asympo_weights(inputs, ObjectiveConfig()) * adv
    verl_loss = agg_loss(-weight[:, None] * lp, mask.double(), agg, **cfg.global_batch_info)
    verl_loss.backward()
    torch.testing.assert_close(loss, verl_loss)
    torch.testing.assert_close(x1.grad, x3.grad)


def test_metrics_are_verl_style_with_the_nll_split():
    logits, mask, adv, old = batch()
    _, metrics = get_policy_loss_fn("asympo")(
        old, log_probs(logits), adv[:, None] * mask, mask, "seq-mean-token-mean", actor_config()
    )
    assert all(k.startswith("actor/asympo/") for k in metrics)
    for key in ("loss", "loss_pos", "loss_neg", "nll_pos", "nll_neg", "nll_ratio", "behaviour_kl"):
        assert f"actor/asympo/{key}" in metrics
    assert abs(metrics["actor/asympo/loss"]) < 1e-9  # asympo's forward value is sum A_i / N = 0


def test_knobs_come_from_the_policy_loss_config():
    logits, mask, adv, _ = batch()
    config = {"policy_loss": {"loss_mode": "spo", "spo_c": 0.2}}
    fn = get_policy_loss_fn("spo")
    loss, _ = fn(None, log_probs(logits), adv[:, None] * mask, mask, "token-mean", config)
    inputs = LossInputs(log_probs(logits), mask, adv, torch.arange(len(adv)))
    ref, _ = compute_loss(inputs, ObjectiveConfig(name="spo", spo_c=0.2, aggregation="token"))
    torch.testing.assert_close(loss, ref)


def test_register_objective_adds_a_variant_and_protects_verl_losses():
    av.register_objective("spo_c02", ObjectiveConfig(name="spo", spo_c=0.2))
    logits, mask, adv, _ = batch()
    a, _ = get_policy_loss_fn("spo_c02")(None, log_probs(logits), adv[:, None] * mask, mask, "token-mean")
    b, _ = get_policy_loss_fn("spo")(
        None, log_probs(logits), adv[:, None] * mask, mask, "token-mean", {"policy_loss": {"spo_c": 0.2}}
    )
    torch.testing.assert_close(a, b)
    with pytest.raises(ObjectiveError, match="already has a policy loss named 'vanilla'"):
        av.register_objective("vanilla", "asympo")
    with pytest.raises(ObjectiveError, match="not a current-policy objective"):
        av.register_objective("my_grpo", "grpo")
    del POLICY_LOSS_REGISTRY["spo_c02"]


def test_refusals_say_what_to_change():
    logits, mask, adv, _ = batch()
    lp, tok_adv = log_probs(logits), adv[:, None] * mask
    fn = get_policy_loss_fn("asympo")
    with pytest.raises(ObjectiveError, match="loss_agg_mode 'token-sum'"):
        fn(None, lp, tok_adv, mask, "token-sum")
    with pytest.raises(ObjectiveError, match="one advantage per response"):
        fn(None, lp, tok_adv + 0.1 * torch.arange(mask.shape[1]), mask, "token-mean")
    with pytest.raises(ObjectiveError, match="rollout_is"):
        fn(None, lp, tok_adv, mask, "token-mean", None, torch.ones_like(lp))
    with pytest.raises(ObjectiveError, match="group ids"):
        fn(None, lp, tok_adv, mask, "token-mean", {"policy_loss": {"asympo_scale": "group"}})


def test_padding_values_do_not_leak():
    """verl's padded positions may hold anything; the per-response advantage ignores them."""
    logits, mask, adv, _ = batch()
    tok_adv = torch.where(mask, adv[:, None].expand_as(mask), torch.tensor(float("nan"), dtype=adv.dtype))
    x = logits.clone().requires_grad_()
    loss, _ = get_policy_loss_fn("asympo")(None, log_probs(x), tok_adv, mask, "seq-mean-token-mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
