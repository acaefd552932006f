"""The math-verify reward: boxed-only by default, equivalence not string equality, and a hanging
verifier cut off by the reward guard's timeout in a real helper process."""

from __future__ import annotations

import textwrap

import pytest

from asympo.rewards.answers import last_boxed
from asympo.rewards.guard import RewardGuard
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


HANGING = """
import time

from asympo.rewards import math as math_reward


def hangs_on_marker(text, answer):
    # A verifier that never returns on one input, as a pathological expression can in sympy.
    if "HANG" in text:
        math_reward.verify = lambda *args, **kwargs: time.sleep(3600)
    return math_reward.boxed_reward(text, answer)
"""


def test_named_math_reward_runs_in_the_guard_and_a_hanging_verifier_is_cut_off(tmp_path, monkeypatch):
    (tmp_path / "hanging_verifier.py").write_text(textwrap.dedent(HANGING))
    monkeypatch.syspath_prepend(str(tmp_path))
    items = [("\\boxed{68}", "68"), ("\\boxed{69}", "68"), ("\\boxed{1/2}", "0.5")]
    with RewardGuard("math", timeout=30.0) as guard:  # a starved machine, not the verifier, is slow here
        assert guard.score(items) == [1.0, 0.0, 1.0]
    with RewardGuard("hanging_verifier:hangs_on_marker", timeout=10.0) as guard:  # a cold parse fits
        rewards = guard.score([("\\boxed{68}", "68"), ("HANG \\boxed{68}", "68"), ("\\boxed{5}", "5")])
        assert rewards == [1.0, 0.0, 1.0]  # the helper was killed and restarted: the next item is scored
        assert (guard.timeouts, guard.restarts) == (1, 1)
