"""Objectives: hand-computed values, ASymPO's zero-sum/gradient properties, padding, normalisers, errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from asympo.advantages import group_advantages
from asympo.config import ObjectiveConfig
from asympo.objectives import (
    OBJECTIVES,
    LossInputs,
    ObjectiveError,
    advantage_method,
    compute_loss,
    get_objective,
)

F64 = torch.float64
ALL = list(OBJECTIVES)
BEHAVIOUR = [n for n, o in OBJECTIVES.items() if o.needs_behaviour]

# A fixed batch: 4 responses of lengths 2, 3, 1, 2 in two groups; ratios chosen to hit every clip branch.
LP = [[-0.5, -1.0], [-2.0, -0.3, -0.7], [-0.1], [-1.2, -0.4]]
BEH = [[-0.6, -0.8], [-2.9, -0.5, -0.7], [-0.4], [-1.2, -0.1]]
PROX = [[-0.55, -0.9], [-2.5, -0.4, -0.6], [-0.2], [-0.9, -0.3]]
ADV = [1.0, -1.0, 0.5, -0.5]
GROUPS = [0, 0, 1, 1]
GARBAGE = [math.nan, math.inf, -math.inf, 1e30]


def _pad(rows: list[list[float]], width: int, garbage: bool) -> torch.Tensor:
    fill = lambda k: GARBAGE[k % 4] if garbage else 0.0  # noqa: E731
    return torch.tensor(
        [r + [fill(i + k) for k in range(width - len(r))] for i, r in enumerate(rows)], dtype=F64
    )


def make_inputs(
    lp=LP, beh=BEH, prox=PROX, adv=ADV, groups=GROUPS, garbage=False, extra_pad=0, **kw
) -> LossInputs:
    width = max(map(len, lp)) + extra_pad
    return LossInputs(
        logprobs=_pad(lp, width, garbage).requires_grad_(),
        mask=torch.tensor([[t < len(r) for t in range(width)] for r in lp]),
        advantages=torch.tensor(adv, dtype=F64),
        group_ids=torch.tensor(groups),
        behaviour_logprobs=_pad(beh, width, garbage),
        proximal_logprobs=_pad(prox, width, garbage),
        **kw,
    )


def clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


REF_AGGREGATION = {
    "pg": "response",
    "spo": "response",
    "spo_pos": "response",
    "asympo": "response",
    "asymre": "response",
    "gpg": "response",
    "grpo": "response",
    "dapo": "token",
    "dr_grpo": "constant",
    "gspo": "response",
    "cispo": "token",
    "tis": "response",
    "decoupled_ppo": "response",
    "m2po": "token",
}


def m2po_dropped(cfg: ObjectiveConfig) -> set[tuple[int, int]]:
    """The (response, token) pairs M2PO masks in the fixed batch: largest (log rho)^2 first, until the
    mean of the rest is at most the threshold."""
    squares = {
        (i, t): (x - y) ** 2
        for i, (lp, b) in enumerate(zip(LP, BEH, strict=True))
        for t, (x, y) in enumerate(zip(lp, b, strict=True))
    }
    dropped: set[tuple[int, int]] = set()
    for key in sorted(squares, key=squares.get, reverse=True):
        rest = [v for k, v in squares.items() if k not in dropped]
        if sum(rest) / len(rest) <= cfg.m2po_threshold:
            break
        dropped.add(key)
    return dropped


def reference_loss(name: str, cfg: ObjectiveConfig) -> float:
    """Each objective written out token by token with Python floats."""
    rows = []
    dropped = m2po_dropped(cfg)
    for lp, b, p, a in zip(LP, BEH, PROX, ADV, strict=True):
        n, lbar = len(lp), -sum(lp) / len(lp)
        rho = [math.exp(x - y) for x, y in zip(lp, b, strict=True)]
        if name in ("pg", "spo", "spo_pos", "asympo", "asymre", "gpg"):
            weight = {
                "pg": a,
                "spo": a if a >= 0 else cfg.spo_c * a,
                "spo_pos": a if a >= 0 else 0.1 * a,
                "asympo": a / max(lbar, cfg.asympo_eps),
                "asymre": a - cfg.asymre_dv,
                "gpg": cfg.gpg_alpha * a,
            }[name]
            row = [weight * -x for x in lp]
        elif name in ("grpo", "dapo", "dr_grpo"):
            high = 1 + (cfg.clip_eps_high if name == "dapo" else cfg.clip_eps)
            row = [-min(r * a, clip(r, 1 - cfg.clip_eps, high) * a) for r in rho]
        elif name == "gspo":
            s = math.exp(sum(x - y for x, y in zip(lp, b, strict=True)) / n)
            row = [-min(s * a, clip(s, 1 - cfg.gspo_eps, 1 + cfg.gspo_eps) * a)] * n
        elif name == "m2po":
            i = len(rows)
            row = [0.0 if (i, t) in dropped else -r * a for t, r in enumerate(rho)]
        elif name in ("cispo", "tis"):
            cap = 1 + cfg.clip_eps_high if name == "cispo" else cfg.tis_cap
            row = [-min(r, cap) * a * x for r, x in zip(rho, lp, strict=True)]
        else:
            row = []
            for x, y, z in zip(lp, b, p, strict=True):
                r, w = math.exp(x - z), min(math.exp(z - y), cfg.behaviour_weight_cap)
                row.append(-w * min(r * a, clip(r, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * a))
        rows.append(row)
    how = REF_AGGREGATION[name]
    if how == "response":
        return sum(sum(r) / len(r) for r in rows) / 4
    return sum(map(sum, rows)) / (8 if how == "token" else 4 * 3)


@pytest.mark.parametrize("name", ALL)
def test_hand_computed_value(name):
    # asympo_eps=0.2 clamps response 2 (lbar 0.1), else asympo's value would be exactly 0
    cfg = ObjectiveConfig(name=name, gpg_alpha=2.0, behaviour_weight_cap=1.2, asympo_eps=0.2)
    loss, metrics = compute_loss(make_inputs(), cfg)
    expected = reference_loss(name, cfg)
    assert abs(expected) > 1e-3  # a value that could be wrong
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-9)
    assert OBJECTIVES[name].default_aggregation == REF_AGGREGATION[name]


def test_clip_branches_are_exercised():
    """The fixed batch is only a good reference if clipping actually happens for the clipped objectives."""
    metrics = {
        n: compute_loss(make_inputs(), ObjectiveConfig(name=n, behaviour_weight_cap=1.2))[1]
        for n in BEHAVIOUR
    }
    assert metrics["grpo"]["clip_frac"] == pytest.approx(2 / 8)  # response 2 (rho 1.35, A>0), 3 (0.74, A<0)
    assert metrics["cispo"]["clip_frac"] == pytest.approx(2 / 8)  # rho 2.46 and 1.35 above 1.28
    assert metrics["tis"]["clip_frac"] == pytest.approx(1 / 8)
    assert metrics["gspo"]["clip_frac"] == pytest.approx(2 / 4)
    assert metrics["m2po"]["clip_frac"] == pytest.approx(1 / 8)  # (log rho)^2: 0.81 goes, 0.27 / 7 <= 0.04
    assert metrics["m2po"]["m2"] == pytest.approx(1.08 / 8) and metrics["m2po"]["m2_kept"] == pytest.approx(
        0.27 / 7
    )
    assert metrics["decoupled_ppo"]["clip_frac"] == pytest.approx(1 / 8)
    rhos = [math.exp(x - y) for lp, b in zip(LP, BEH, strict=True) for x, y in zip(lp, b, strict=True)]
    assert metrics["grpo"]["ratio_mean"] == pytest.approx(sum(rhos) / 8)
    kl = sum(y - x for lp, b in zip(LP, BEH, strict=True) for x, y in zip(lp, b, strict=True)) / 8
    assert metrics["grpo"]["behaviour_kl"] == pytest.approx(kl)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.04, 0.5])
def test_m2po_masks_the_fewest_largest_tokens_that_bring_the_second_moment_under_the_threshold(
    seed, threshold
):
    """M2PO's defining property: over the tokens kept, mean (log rho)^2 <= threshold; the dropped ones are
    the largest, and keeping one more of them would break the bound."""
    from asympo.objectives.behaviour import m2po_keep

    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(6, 20, generator=g, dtype=F64) * 0.4
    mask = torch.arange(20)[None, :] < torch.randint(5, 21, (6, 1), generator=g)
    keep = m2po_keep(log_ratio, mask, threshold)
    squared = log_ratio.square()
    assert not (keep & ~mask).any()  # padding is never kept
    kept, dropped = squared[keep], squared[mask & ~keep]
    if threshold >= squared[mask].mean():  # 0.5: already under the bound (the batch's is about 0.16)
        assert dropped.numel() == 0
        return
    assert dropped.numel() > 0 and kept.mean() <= threshold
    assert dropped.min() >= kept.max()  # the outliers go, nothing else
    one_more = torch.cat([kept, dropped.min()[None]])
    assert one_more.mean() > threshold  # as few as possible
    assert compute_loss(make_inputs(), ObjectiveConfig(name="m2po", m2po_threshold=1.0))[1]["clip_frac"] == 0


# --- ASymPO ------------------------------------------------------------------------------------------


def random_batch(seed: int, low: float = 0.1, high: float = 3.0, b: int = 8, t: int = 6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lp = -(low + (high - low) * torch.rand(b, t, generator=gen, dtype=F64))
    groups = torch.arange(b) % 2  # interleaved groups of b / 2
    adv = group_advantages(torch.rand(b, generator=gen, dtype=F64), groups)
    inputs = LossInputs(lp.clone().requires_grad_(), torch.arange(t)[None] < lengths[:, None], adv, groups)
    return inputs, lengths


def explicit_lbar(lp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.stack([-lp[i, : lengths[i]].sum() / lengths[i] for i in range(len(lengths))])


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("scale", ["none", "group"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asympo_complete_groups_sum_to_zero(seed, scale):
    inputs, _ = random_batch(seed)
    loss, metrics = compute_loss(inputs, ObjectiveConfig(name="asympo", asympo_scale=scale))
    assert abs(loss.item()) < 1e-6
    assert metrics["loss_pos"] > 0.1
    assert metrics["loss_pos"] + metrics["loss_neg"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("scale", ["none", "group"])
def test_asympo_gradient_is_A_grad_log_lbar(scale):
    """Fails if the stop-gradient is dropped: C A lbar would then be the constant A, with zero gradient."""
    inputs, lengths = random_batch(3)
    loss, _ = compute_loss(inputs, ObjectiveConfig(name="asympo", asympo_scale=scale))
    got = grad_of(loss, inputs.logprobs)

    lp = inputs.logprobs.detach().clone().requires_grad_()
    lbar = explicit_lbar(lp, lengths)
    scale_i = torch.ones(8, dtype=F64)
    if scale == "group":
        scale_i = torch.stack([lbar.detach()[inputs.group_ids == g].mean() for g in inputs.group_ids])
    expected = grad_of((scale_i * inputs.advantages * lbar.log()).sum() / 8, lp)
    assert got.norm() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)

    lbar = explicit_lbar(lp, lengths)
    undetached = (inputs.advantages * lbar / lbar).sum() / 8  # what the loss would be without sg()
    assert grad_of(undetached, lp).abs().max() < 1e-12


def test_asympo_group_scale_keeps_pg_gradient_scale():
    inputs, _ = random_batch(4, low=0.1, high=0.5)  # lbar ~ 0.3: plain asympo takes ~3x pg's steps
    norms = {}
    for key, cfg in {
        "pg": ObjectiveConfig(name="pg"),
        "none": ObjectiveConfig(name="asympo"),
        "group": ObjectiveConfig(name="asympo", asympo_scale="group"),
    }.items():
        norms[key] = grad_of(compute_loss(inputs, cfg)[0], inputs.logprobs).norm().item()
    assert norms["none"] / norms["pg"] > 2
    assert 0.5 < norms["group"] / norms["pg"] < 2


def test_asympo_eps_clamp():
    """A response with lbar = 0.001 < eps gets C = 1/eps, not 1/0.001."""
    lp = [[-0.001, -0.001], [-1.0, -1.0]]
    inputs = make_inputs(lp=lp, beh=lp, prox=lp, adv=[1.0, -1.0], groups=[0, 0])
    _, contrib = get_objective("asympo").fn(inputs, ObjectiveConfig(name="asympo", asympo_eps=0.01))
    assert contrib.tolist() == pytest.approx([1.0 * 0.001 / 0.01 / 2, -1.0 / 2])
    metrics = compute_loss(inputs, ObjectiveConfig(name="asympo", asympo_eps=0.01))[1]
    assert metrics["asympo_scale_mean"] == pytest.approx((100 + 1) / 2)
    assert metrics["asympo_scale_max"] == pytest.approx(100)
    assert (metrics["asympo_scale_pos"], metrics["asympo_scale_neg"]) == pytest.approx((100, 1))


def test_asympo_positive_share_is_a_half_at_equal_nll_and_tilts_to_the_likelier_side():
    """With zero-sum advantages pg splits sum |C A| evenly; ASymPO moves it to the lower-NLL responses."""
    even_lp = [[-1.0, -1.0], [-1.0, -1.0]]
    even = make_inputs(lp=even_lp, beh=even_lp, prox=even_lp, adv=[1.0, -1.0], groups=[0, 0])
    assert compute_loss(even, ObjectiveConfig(name="asympo"))[1]["asympo_pos_share"] == pytest.approx(0.5)
    lp = [[-0.5, -0.5], [-2.0, -2.0]]
    tilted = make_inputs(lp=lp, beh=lp, prox=lp, adv=[1.0, -1.0], groups=[0, 0])
    metrics = compute_loss(tilted, ObjectiveConfig(name="asympo"))[1]
    assert metrics["asympo_pos_share"] == pytest.approx((1 / 0.5) / (1 / 0.5 + 1 / 2.0))


# --- relations between objectives ----------------------------------------------------------------


def test_spo_scales_only_negatives():
    inputs, cfg = make_inputs(), ObjectiveConfig(name="spo", spo_c=0.3)
    _, spo = get_objective("spo").fn(inputs, cfg)
    _, pg = get_objective("pg").fn(inputs, cfg)
    adv = inputs.advantages
    torch.testing.assert_close(spo[adv > 0], pg[adv > 0])
    torch.testing.assert_close(spo[adv < 0], 0.3 * pg[adv < 0])


def test_spo_pos_keeps_positives_and_takes_a_tenth_of_negatives_whatever_spo_c():
    """Its defining property: per response, positives contribute pg's term and negatives exactly a tenth of
    it, with gradients in the same ratio; spo_c (spo's knob) does not move it."""
    inputs = make_inputs()
    _, pos = get_objective("spo_pos").fn(inputs, ObjectiveConfig(name="spo_pos", spo_c=0.7))
    _, pg = get_objective("pg").fn(inputs, ObjectiveConfig(name="pg"))
    adv = inputs.advantages
    torch.testing.assert_close(pos[adv > 0], pg[adv > 0])
    torch.testing.assert_close(pos[adv < 0], 0.1 * pg[adv < 0])
    (grad_pos,) = torch.autograd.grad(pos[adv < 0].sum(), inputs.logprobs)
    (grad_pg,) = torch.autograd.grad(pg[adv < 0].sum(), inputs.logprobs)
    torch.testing.assert_close(grad_pos, 0.1 * grad_pg)
    spo = get_objective("spo").fn(inputs, ObjectiveConfig(name="spo", spo_c=0.1))[1]
    torch.testing.assert_close(pos, spo)


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_behaviour_objectives_equal_pg_on_policy(name):
    """At behaviour == proximal == current (no clipping) the gradient is pg's under the same aggregation."""
    base = make_inputs()
    frozen = base.logprobs.detach().clone()
    inputs = LossInputs(base.logprobs, base.mask, base.advantages, base.group_ids, frozen, frozen.clone())
    got = grad_of(compute_loss(inputs, ObjectiveConfig(name=name))[0], inputs.logprobs)
    pg_cfg = ObjectiveConfig(name="pg", aggregation=OBJECTIVES[name].default_aggregation)
    torch.testing.assert_close(got, grad_of(compute_loss(inputs, pg_cfg)[0], inputs.logprobs))
    assert got.abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_padding_never_contributes(name):
    cfg = ObjectiveConfig(name=name)
    lp, beh, prox = [*LP, []], [*BEH, []], [*PROX, []]  # plus an empty response
    kw = dict(lp=lp, beh=beh, prox=prox, adv=[*ADV, 0.7], groups=[*GROUPS, 2], extra_pad=2)
    clean, dirty = make_inputs(**kw), make_inputs(garbage=True, **kw)
    assert dirty.logprobs.detach().isnan().any() and dirty.behaviour_logprobs.isinf().any()
    (loss_c, m_c), (loss_d, m_d) = compute_loss(clean, cfg), compute_loss(dirty, cfg)
    assert torch.isfinite(loss_d) and loss_d.item() == loss_c.item() and m_d == m_c
    grad_c, grad_d = grad_of(loss_c, clean.logprobs), grad_of(loss_d, dirty.logprobs)
    assert torch.equal(grad_c, grad_d)
    assert (grad_d[~dirty.mask] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_identical_rewards_give_zero_loss(name):
    cfg = ObjectiveConfig(name=name)
    rewards = torch.tensor([1.0, 1.0, 0.3, 0.3], dtype=F64)
    adv = group_advantages(rewards, torch.tensor(GROUPS), advantage_method(cfg)).tolist()
    inputs = make_inputs(adv=adv)
    loss, metrics = compute_loss(inputs, cfg)
    grad = grad_of(loss, inputs.logprobs)
    assert adv == [0.0] * 4 and not grad.isnan().any() and all(math.isfinite(v) for v in metrics.values())
    if name == "asymre":  # the shifted baseline pushes every response up by -dv, by design
        lbars = [-sum(r) / len(r) for r in LP]
        assert loss.item() == pytest.approx(-cfg.asymre_dv * sum(lbars) / 4)
    else:
        assert loss.item() == 0.0 and (grad == 0).all()
    assert "nll_pos" not in metrics and "nll_ratio" not in metrics


@pytest.mark.parametrize("aggregation", ["response", "token", "constant"])
@pytest.mark.parametrize("name", ALL)
def test_micro_batches_add_up(name, aggregation):
    cfg = ObjectiveConfig(name=name, aggregation=aggregation, asympo_scale="group")
    gen = torch.Generator().manual_seed(0)
    lp = [[-float(x) for x in torch.rand(n, generator=gen) * 2 + 0.05] for n in [3, 1, 4, 2, 4, 2, 1, 3]]
    beh = [[x - 0.1 * (k % 3) for k, x in enumerate(r)] for r in lp]
    groups = [0, 1, 2, 3, 0, 1, 2, 3]
    adv = group_advantages(torch.rand(8, generator=gen), torch.tensor(groups)).tolist()
    full = make_inputs(lp=lp, beh=beh, prox=beh, adv=adv, groups=groups)
    full_loss = compute_loss(full, cfg)[0]
    parts = 0.0
    for rows in ([0, 2, 4, 6], [1, 3, 5, 7]):
        pick = lambda xs, rows=rows: [xs[i] for i in rows]  # noqa: E731
        mb = make_inputs(
            lp=pick(lp),
            beh=pick(beh),
            prox=pick(beh),
            adv=pick(adv),
            groups=pick(groups),
            total_responses=8,
            total_tokens=20,
            max_len=4,
        )
        parts = parts + compute_loss(mb, cfg)[0].item()
    assert parts == pytest.approx(full_loss.item(), rel=1e-9, abs=1e-12)


# --- metrics -------------------------------------------------------------------------------------


def test_nll_metrics_by_hand():
    metrics = compute_loss(make_inputs(), ObjectiveConfig(name="pg"))[1]
    lbar = [0.75, 1.0, 0.1, 0.8]  # mean token NLL of each response in LP
    assert metrics["nll_pos"] == pytest.approx((lbar[0] + lbar[2]) / 2)
    assert metrics["nll_neg"] == pytest.approx((lbar[1] + lbar[3]) / 2)
    assert metrics["nll_ratio"] == pytest.approx(0.425 / 0.9)
    assert metrics["loss_pos"] == pytest.approx((1.0 * 0.75 + 0.5 * 0.1) / 4)
    assert metrics["loss_neg"] == pytest.approx((-1.0 * 1.0 - 0.5 * 0.8) / 4)


@pytest.mark.parametrize("name", ALL)
def test_loss_split_adds_up(name):
    adv = [1.0, -1.0, 0.0, 0.0]  # a zero-advantage group too
    inputs = make_inputs(adv=adv)
    cfg = ObjectiveConfig(name=name)
    _, contrib = OBJECTIVES[name].fn(inputs, cfg)
    metrics = compute_loss(inputs, cfg)[1]
    zero_part = contrib[2:].sum().item()
    assert metrics["loss_pos"] + metrics["loss_neg"] + zero_part == pytest.approx(metrics["loss"], abs=1e-12)
    assert metrics["loss_pos"] == pytest.approx(contrib[0].item())


def test_undefined_metrics_are_omitted():
    metrics = compute_loss(make_inputs(adv=[1.0, 0.0, 0.5, 0.0]), ObjectiveConfig(name="asympo"))[1]
    assert "nll_pos" in metrics and "nll_neg" not in metrics and "nll_ratio" not in metrics
    assert "behaviour_kl" in metrics  # behaviour log-probs were given
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


# --- errors, config, purity ----------------------------------------------------------------------


def test_missing_behaviour_or_proximal_logprobs():
    bare = make_inputs()
    no_behaviour = replace(bare, behaviour_logprobs=None, proximal_logprobs=None)
    with pytest.raises(ObjectiveError, match=r"'grpo' needs behaviour log-probs.*\bpg\b.*asympo"):
        compute_loss(no_behaviour, ObjectiveConfig(name="grpo"))
    with pytest.raises(ObjectiveError, match="'decoupled_ppo' needs proximal log-probs"):
        compute_loss(replace(bare, proximal_logprobs=None), ObjectiveConfig(name="decoupled_ppo"))
    compute_loss(no_behaviour, ObjectiveConfig(name="asympo"))  # current-policy objectives do not need them


def test_unknown_names_and_bad_values():
    with pytest.raises(ObjectiveError, match="unknown objective 'nope'.*asympo.*decoupled_ppo"):
        get_objective("nope")
    with pytest.raises(ValidationError, match="unknown objective 'nope'"):
        ObjectiveConfig(name="nope")
    bad = [
        {"spo_c": 1.5},
        {"spo_c": 0},
        {"asympo_eps": 0},
        {"asymre_dv": 0.1},
        {"gpg_alpha": -1},
        {"asympo_scale": "batch"},
        {"aggregation": "sum"},
        {"advantage": "max"},
        {"clip_eps": 1.5},
        {"lr": 1},
    ]
    for kw in bad:
        with pytest.raises(ValidationError):
            ObjectiveConfig(**kw)
    bad_shape = make_inputs()
    with pytest.raises(ObjectiveError, match=r"\[B\]"):
        compute_loss(
            LossInputs(bad_shape.logprobs, bad_shape.mask, torch.zeros(3), bad_shape.group_ids),
            ObjectiveConfig(),
        )


def test_advantage_defaults():
    assert advantage_method(ObjectiveConfig(name="asympo")) == "group_norm"
    assert advantage_method(ObjectiveConfig(name="dr_grpo")) == "mean"
    assert advantage_method(ObjectiveConfig(name="asymre")) == "mean"
    assert advantage_method(ObjectiveConfig(name="gpg", advantage="loo")) == "loo"


@pytest.mark.parametrize("name", ALL)
def test_differentiable_only_through_logprobs_and_dtype(name):
    inputs = make_inputs()
    beh, prox = inputs.behaviour_logprobs.requires_grad_(), inputs.proximal_logprobs.requires_grad_()
    adv = inputs.advantages.requires_grad_()
    loss, _ = compute_loss(inputs, ObjectiveConfig(name=name))
    loss.backward()
    assert beh.grad is None and prox.grad is None and adv.grad is None
    assert inputs.logprobs.grad is not None and loss.dtype == F64
    half = LossInputs(
        inputs.logprobs.detach().bfloat16().requires_grad_(),
        inputs.mask,
        adv.detach(),
        inputs.group_ids,
        beh.detach().bfloat16(),
        prox.detach().bfloat16(),
    )
    half_loss, _ = compute_loss(half, ObjectiveConfig(name=name))
    assert half_loss.dtype == torch.bfloat16 and torch.isfinite(half_loss)
