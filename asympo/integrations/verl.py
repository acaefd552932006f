"""asympo's objectives as verl policy losses: `actor_rollout_ref.actor.policy_loss.loss_mode=asympo`.

Importing this module registers `asympo`, `spo`, `spo_pos` and `pg` in verl's policy-loss registry
(`verl.trainer.ppo.core_algos.register_policy_loss`). Each one builds `LossInputs` from the tensors verl
hands a policy loss and calls `asympo.objectives.compute_loss`, so the formulas live in one place.

verl runs its actors in Ray worker processes, so the registration has to happen there as well. asympo
declares this module as a `verl.plugins` entry point, which `import verl` loads in every process (unless
`VERL_USE_EXTERNAL_PLUGINS` excludes it): installing asympo next to verl is enough. Where plugins are
turned off, `VERL_USE_EXTERNAL_MODULES=asympo.integrations.verl` or
`actor_rollout_ref.model.external_lib=asympo.integrations.verl` import it in the workers too.

What the objective receives from verl:
- log-probs: verl's current-policy `log_prob`, mask: `response_mask`;
- advantages: verl's token advantages must hold one value per response (outcome estimators such as
  `grpo`, `rloo`, `reinforce_plus_plus_baseline`); that value is used. Per-token advantages (`gae`) are
  refused: these objectives weight whole responses;
- behaviour log-probs: verl's `old_log_prob` when present, only for the `behaviour_kl` diagnostic (the
  losses themselves never read it);
- group ids: verl does not pass them to a policy loss, so each response is its own group and
  `asympo_scale="group"` is refused.

Aggregation follows verl's `loss_agg_mode`, with verl's global normalisers (`config.global_batch_info`):
`seq-mean-token-mean` is asympo's `response` (every response weighs the same, asympo's default),
`token-mean` is `token`, `seq-mean-token-sum-norm` is `constant` (Dr.GRPO; length normaliser
`loss_scale_factor`, else the padded length) and `seq-mean-token-sum` is `constant` with a normaliser of 1.
`token-sum` is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError("asympo.integrations.verl needs verl: pip install 'asympo[verl]'") from e

from asympo.config import ObjectiveConfig
from asympo.objectives import LossInputs, ObjectiveError, compute_loss, get_objective

LOSS_MODES = ("asympo", "spo", "spo_pos", "pg")
# ObjectiveConfig knobs that may be set on verl's policy-loss config, where verl's config allows it.
KNOBS = ("spo_c", "asympo_eps", "asympo_scale")
# verl's loss_agg_mode -> asympo's aggregation.
AGGREGATION = {
    "seq-mean-token-mean": "response",
    "token-mean": "token",
    "seq-mean-token-sum-norm": "constant",
    "seq-mean-token-sum": "constant",
}
ADVANTAGE_TOL = 1e-5  # relative spread allowed within one response's token advantages


def _get(config: Any, key: str, default: Any = None) -> Any:
    """`config.key` or `config[key]`, for verl's dataclass configs, OmegaConf and plain dicts alike."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    try:
        value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def objective_config(base: ObjectiveConfig, config: Any) -> ObjectiveConfig:
    """`base` with any knob set on verl's `config.policy_loss` (spo_c, asympo_eps, asympo_scale)."""
    policy_loss = _get(config, "policy_loss")
    knobs = {k: v for k in KNOBS if (v := _get(policy_loss, k)) is not None}
    cfg = base.model_copy(update=knobs) if knobs else base
    if knobs:
        cfg = ObjectiveConfig.model_validate(cfg.model_dump())  # validate the overrides
    if cfg.asympo_scale == "group":
        raise ObjectiveError(
            "asympo_scale='group' needs group ids, which verl does not pass to a policy loss; use 'none'"
        )
    return cfg


def response_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """One advantage per response [B] from verl's token advantages [B, T], which must be constant per row."""
    zero = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    adv = torch.where(mask, advantages, zero).detach()
    count = mask.sum(-1).clamp(min=1)
    value = adv.sum(-1) / count
    spread = torch.where(mask, (adv - value[:, None]).abs(), zero).amax(-1) if adv.numel() else value
    if bool((spread > ADVANTAGE_TOL * (1 + value.abs())).any()):
        raise ObjectiveError(
            "asympo objectives weight whole responses and need one advantage per response (outcome "
            "estimators: algorithm.adv_estimator=grpo, rloo, ...); got advantages that vary along a response"
        )
    return value


def loss_inputs(
    log_prob: Tensor,
    old_log_prob: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str,
    config: Any,
) -> tuple[LossInputs, str]:
    """verl's policy-loss arguments as asympo's LossInputs, plus the asympo aggregation to use."""
    if loss_agg_mode not in AGGREGATION:
        raise ObjectiveError(
            f"loss_agg_mode '{loss_agg_mode}' has no asympo equivalent; use one of {', '.join(AGGREGATION)} "
            "(seq-mean-token-mean is asympo's default: every response weighs the same)"
        )
    mask = response_mask.bool()
    info = dict(_get(config, "global_batch_info", None) or {})
    dp_size = info.get("dp_size") or 1
    total_responses = total_tokens = None
    # verl normalises each micro-batch by global counts times dp_size (then averages over ranks); the same
    # scale in asympo's terms is the global count divided by dp_size.
    if info.get("global_batch_size") is not None:
        total_responses = info["global_batch_size"] / dp_size
    elif loss_agg_mode != "token-mean":
        total_responses = int((mask.sum(-1) > 0).sum().clamp(min=1))  # verl skips empty responses
    if info.get("batch_num_tokens") is not None:
        total_tokens = info["batch_num_tokens"] / dp_size
    if loss_agg_mode == "seq-mean-token-sum":
        max_len = 1
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        max_len = info.get("loss_scale_factor") or _get(config, "loss_scale_factor") or mask.shape[-1]
    else:
        max_len = None
    inputs = LossInputs(
        logprobs=log_prob,
        mask=mask,
        advantages=response_advantages(advantages, mask),
        group_ids=torch.arange(log_prob.shape[0], device=log_prob.device),
        behaviour_logprobs=None if old_log_prob is None else old_log_prob.detach(),
        total_responses=total_responses,
        total_tokens=total_tokens,
        max_len=max_len,
    )
    return inputs, AGGREGATION[loss_agg_mode]


def make_policy_loss(objective: ObjectiveConfig):
    """A function with verl's policy-loss signature that computes `objective` with asympo's code."""
    spec = get_objective(objective.name)
    if spec.needs_behaviour or spec.needs_proximal:
        raise ObjectiveError(f"'{spec.name}' is not a current-policy objective: use verl's own version")

    def policy_loss(
        old_log_prob: Tensor | None,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        if rollout_is_weights is not None:
            raise ObjectiveError(
                f"'{objective.name}' is a current-policy objective and takes no importance weights: turn off "
                "algorithm.rollout_correction.rollout_is"
            )
        inputs, aggregation = loss_inputs(
            log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, config
        )
        cfg = objective_config(objective, config).model_copy(update={"aggregation": aggregation})
        loss, metrics = compute_loss(inputs, cfg)
        return loss, {f"actor/asympo/{name}": value for name, value in metrics.items()}

    policy_loss.__name__ = policy_loss.__qualname__ = f"asympo_{objective.name}_policy_loss"
    policy_loss.__doc__ = f"asympo's '{objective.name}' objective as a verl policy loss."
    return policy_loss


def register_objective(loss_mode: str, objective: str | ObjectiveConfig) -> None:
    """Register an asympo objective under `loss_mode` (replacing an asympo one of that name).

    verl 0.9's policy-loss config accepts no extra keys, so a variant with other knobs gets its own name:
    `register_objective("spo_c03", ObjectiveConfig(name="spo", spo_c=0.3))` in a module the workers import.
    """
    cfg = objective if isinstance(objective, ObjectiveConfig) else ObjectiveConfig(name=objective)
    fn = make_policy_loss(cfg)
    existing = POLICY_LOSS_REGISTRY.get(loss_mode)
    if existing is not None and not getattr(existing, "_asympo", False):
        raise ObjectiveError(f"verl already has a policy loss named '{loss_mode}'; pick another name")
    fn._asympo = True  # type: ignore[attr-defined]  # marks asympo's own, which may be re-registered
    register_policy_loss(loss_mode)(fn)


for _name in LOSS_MODES:
    register_objective(_name, _name)


__all__ = ["LOSS_MODES", "make_policy_loss", "register_objective"]
