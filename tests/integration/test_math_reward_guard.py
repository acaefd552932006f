"""The named math reward in a real reward-guard helper process: scored there, and a hanging verifier cut off
by the guard's timeout. The reward's definitions: tests/unit/test_math_reward.py."""

from __future__ import annotations

import textwrap

from asympo.rewards.guard import RewardGuard

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
