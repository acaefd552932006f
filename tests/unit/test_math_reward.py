"""The math-verify reward: boxed-only by default, equivalence not string equality. A hanging verifier cut
off by the reward guard's timeout in a real helper process: tests/integration/test_math_reward_guard.py."""

from __future__ import annotations

import pytest

from asympo.data.answers import last_boxed
from asympo.rewards.math import boxed_format_reward, boxed_reward, lenient_reward


@pytest.mark.parametrize(
    "text, boxed",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("no box, just 42", None),
        ("cut off \\boxed{\\frac{1}{2", None),
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    "response, answer, reward",
    [
        ("23 + 45 = 68. The final answer is \\boxed{68}.", "68", 1.0),
        ("\\boxed{68.0}", "68", 1.0),
        ("\\boxed{\\frac{136}{2}}", "68", 1.0),
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{69}", "68", 0.0),
        ("The answer is 68.", "68", 0.0),  # boxed-only: a bare number does not count
        ("first 68, then \\boxed{70}", "68", 0.0),
        ("", "68", 0.0),
    ],
)
def test_boxed_reward_checks_equivalence_of_the_boxed_answer_only(response, answer, reward):
    assert boxed_reward(response, answer) == reward


def test_lenient_reward_falls_back_to_the_last_number_only_without_a_box():
    assert lenient_reward("The answer is 1,000.", "1000") == 1.0
    assert lenient_reward("68 is close, but 70", "68") == 0.0
    assert lenient_reward("68 first, then \\boxed{70}", "68") == 0.0
    assert lenient_reward("no numbers", "68") == 0.0


def test_format_reward_adds_a_small_bonus_for_any_boxed_answer():
    assert boxed_format_reward("\\boxed{68}", "68") == pytest.approx(1.1)
    assert boxed_format_reward("\\boxed{69}", "68") == pytest.approx(0.1)
    assert boxed_format_reward("68", "68") == 0.0
