"""Group-relative advantages against hand computations on interleaved, non-contiguous groups."""

from __future__ import annotations

import math

import pytest
import torch

from asympo.advantages import group_advantages, group_mean

# group 7 at rows 0, 2, 4; group 3 at rows 1, 3; group 5 (a single response) at row 5
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.3]
GROUPS = [7, 3, 7, 3, 7, 5]


def _members(i: int) -> list[float]:
    return [r for r, g in zip(REWARDS, GROUPS, strict=True) if g == GROUPS[i]]


def _expected(method: str) -> list[float]:
    out = []
    for i, r in enumerate(REWARDS):
        rs = _members(i)
        mean = sum(rs) / len(rs)
        if method == "group_norm":
            std = math.sqrt(sum((x - mean) ** 2 for x in rs) / len(rs))  # population std
            out.append((r - mean) / (std + 1e-6))
        elif method == "mean":
            out.append(r - mean)
        else:
            others = list(rs)
            others.remove(r)
            out.append(r - sum(others) / len(others) if others else 0.0)
    return out


@pytest.mark.parametrize("method", ["group_norm", "mean", "loo"])
def test_hand_computed(method):
    adv = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS), method)
    torch.testing.assert_close(
        adv, torch.tensor(_expected(method), dtype=torch.float64), rtol=1e-9, atol=1e-9
    )


def test_hand_values_spelled_out():
    """The formulas above, pinned to numbers: population std for [0, 1] is 0.5, so +-1 (not +-0.707)."""
    r, g = torch.tensor(REWARDS), torch.tensor(GROUPS)
    norm = group_advantages(r, g, "group_norm")
    assert norm[1].item() == pytest.approx(-1.0, abs=1e-5) and norm[3].item() == pytest.approx(1.0, abs=1e-5)
    assert norm[0].item() == pytest.approx((1 / 3) / math.sqrt(2 / 9), abs=1e-5)
    loo = group_advantages(r, g, "loo")
    assert loo.tolist() == pytest.approx([0.5, -1.0, -1.0, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("method", ["group_norm", "mean", "loo"])
def test_single_response_group_gives_zero(method):
    adv = group_advantages(torch.tensor([0.3, 1.0, 0.0]), torch.tensor([9, 1, 1]), method)
    assert adv[0].item() == 0.0


@pytest.mark.parametrize("method", ["group_norm", "mean", "loo"])
def test_identical_rewards_give_exact_zeros(method):
    """0.1 * 3 / 3 != 0.1 in floats: without care the residue would be blown up by a ~0 std."""
    rewards = torch.tensor([0.1, 0.7, 0.1, 0.7, 0.1, 0.3], dtype=torch.float64)
    adv = group_advantages(rewards, torch.tensor([0, 1, 0, 1, 0, 1]), method)
    assert not adv.isnan().any()
    assert adv[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    assert adv[[1, 3, 5]].abs().min() > 0.1


@pytest.mark.parametrize("method", ["group_norm", "mean", "loo"])
def test_groups_sum_to_zero(method):
    gen = torch.Generator().manual_seed(0)
    rewards, groups = torch.rand(24, generator=gen), torch.randperm(24, generator=gen) % 4
    adv = group_advantages(rewards, groups, method)
    for g in range(4):
        assert adv[groups == g].sum().abs() < 1e-5


def test_integer_rewards_and_group_mean():
    adv = group_advantages(torch.tensor([1, 0, 0, 0]), torch.tensor([0, 0, 0, 0]), "mean")
    assert adv.dtype == torch.float32 and adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert group_mean(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([5, 2, 5])).tolist() == [2.5, 2.0, 2.5]


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown advantage method"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(torch.zeros(2), torch.zeros(3, dtype=torch.long))
