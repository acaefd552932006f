"""Which objective and its knobs. The names are declared here, as the schema; asympo.objectives registers
an implementation under each (a unit test checks that the two lists agree)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from asympo.config.base import Strict

ObjectiveName = Literal[
    "pg", "spo", "spo_pos", "asympo", "asymre", "gpg",  # current-policy: no behaviour log-probs
    "grpo", "dapo", "dr_grpo", "gspo", "cispo", "tis", "m2po", "decoupled_ppo",  # behaviour-corrected
]  # fmt: skip
OBJECTIVE_NAMES: tuple[str, ...] = get_args(ObjectiveName)

Aggregation = Literal["response", "token", "constant"]


class ObjectiveConfig(Strict):
    """Which objective and its knobs. `None` for advantage/aggregation means the objective's own default."""

    name: ObjectiveName = "asympo"
    """The loss: a current-policy objective (pg, spo, spo_pos, asympo, asymre, gpg) or a behaviour-corrected
    one that needs behaviour log-probs (grpo, dapo, dr_grpo, gspo, cispo, tis, m2po, decoupled_ppo)."""
    advantage: Literal["group_norm", "mean", "loo"] | None = None
    """`group_norm` ((r - mean) / std within the group), `mean` (no std) or `loo` (leave-one-out baseline);
    null: the objective's default."""
    aggregation: Aggregation | None = None
    """How token losses are averaged: per `response`, per `token`, or `constant` (sum / (responses x
    max_len), Dr.GRPO); null: the objective's default."""
    spo_c: float = Field(0.5, gt=0, lt=1)
    """spo: the weight of negative-advantage responses (lower leans more on the positives)."""
    asympo_eps: float = Field(1e-2, gt=0)
    """asympo: floor on sg(lbar) in C = 1 / max(sg(lbar), eps); bounds the weight of low-NLL responses."""
    asympo_scale: Literal["none", "group"] = "none"
    """asympo: `group` multiplies C by sg(the group's mean lbar), keeping pg's gradient scale."""
    asymre_dv: float = Field(-0.1, lt=0)
    """asymre: baseline shift, V = mean(r) + dv (negative)."""
    gpg_alpha: float = Field(1.0, gt=0)
    """gpg: advantage scale, A = alpha (r - mean r)."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """PPO-style clip range (1 - eps, 1 + eps) of the token ratio (grpo, dr_grpo, decoupled_ppo; dapo's
    lower side)."""
    clip_eps_high: float = Field(0.28, gt=0)
    """dapo's and cispo's upper clip (clip-higher)."""
    gspo_eps: float = Field(3e-4, gt=0, lt=1)
    """gspo: clip range of the sequence-level ratio, hence small."""
    tis_cap: float = Field(2.0, gt=0)
    """tis: truncation of the importance weight."""
    m2po_threshold: float = Field(0.04, gt=0)
    """m2po: bound on the mean (log rho)^2 of the tokens kept in the loss."""
    behaviour_weight_cap: float = Field(5.0, gt=0)
    """decoupled_ppo: cap on the behaviour weight pi_prox / pi_behav."""
    kl_coef: float = Field(0.0, ge=0)
    """KL penalty to a frozen reference (the initial weights), as in GRPO's recipe: adds kl_coef x the token
    mean of the estimator; > 0 loads the reference and adds its forward to each step, 0 skips both."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """The KL estimator, with r = pi_ref / pi: `k1` (-log r), `k2` ((log r)^2 / 2) or `k3` (r - 1 - log r,
    never negative)."""

    @field_validator("name", mode="before")
    @classmethod
    def _known_name(cls, name: object) -> object:
        if name not in OBJECTIVE_NAMES:
            raise ValueError(f"unknown objective '{name}'; known: {', '.join(OBJECTIVE_NAMES)}")
        return name
