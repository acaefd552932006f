"""The reward guard with real helper processes: raising, hanging, NaN and crashing rewards give counted 0s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from asympo.errors import UserError
from asympo.rewards.guard import RewardGuard, load_reward

# Written to a temporary directory on sys.path: the spawned child inherits sys.path and imports these.
REWARDS = """
import math
import os
import signal
import time


def exact_or_raise(text, answer):
    if text == "raise":
        raise ValueError("boom")
    return 1.0 if text.strip() == answer.strip() else 0.0


def hang_on(text, answer):
    if text == "hang":
        time.sleep(3600)
    return 1.0 if text == answer else 0.0


def sleeps(text, answer):
    time.sleep(float(text))
    return 1.0


def returns_nan(text, answer):
    return math.nan if text == "nan" else 1.0


def returns_text(text, answer):
    return "1.0" if text == "text" else math.inf


def exit_on(text, answer):
    if text == "die":
        os._exit(3)
    return 1.0 if text == answer else 0.0


def torch_loaded(text, answer):
    import sys

    return float("torch" in sys.modules)


not_callable = 42
"""
# Imports fine in the parent (so the spec validates) but fails or hangs in the spawned child.
FAILS_IN_CHILD = """
import multiprocessing
if multiprocessing.parent_process() is not None:
    raise RuntimeError("cannot start here")
def reward(text, answer):
    return 1.0
"""
HANGS_IN_CHILD = """
import multiprocessing, time
if multiprocessing.parent_process() is not None:
    time.sleep(3600)
def reward(text, answer):
    return 1.0
"""


@pytest.fixture(scope="module", autouse=True)
def reward_modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    for name, source in [("guard_rewards", REWARDS), ("fails_in_child", FAILS_IN_CHILD)]:
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    (root / "hangs_in_child.py").write_text(HANGS_IN_CHILD)
    (root / "broken_reward.py").write_text("import no_such_dependency_xyz\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield root


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_exact_rewards_for_a_mixed_batch_and_reuse_without_restarts():
    items = [("4", "4"), (" 7 \n", "7"), ("8", "9"), ("", "1")]
    with RewardGuard("exact") as guard:
        for _ in range(3):
            assert guard.score(items) == [1.0, 1.0, 0.0, 0.0]
        pid = guard._proc.pid
        assert guard.score([]) == []
        assert guard._proc.pid == pid  # one child served every batch
        assert (guard.errors, guard.timeouts, guard.restarts) == (0, 0, 0)


def test_a_batch_is_one_message_each_way_not_one_per_item():
    """What keeps a 256-item batch under a millisecond after start-up (a count, not a clock: CI is noisy)."""
    items = [(str(i), str(i if i % 3 else i + 1)) for i in range(256)]
    with RewardGuard("exact") as guard:
        guard.score(items[:1])
        conn = guard._conn
        sent, received = [], []
        real_send, real_recv = conn.send, conn.recv
        conn.send = lambda obj: (sent.append(obj), real_send(obj))[1]
        conn.recv = lambda: received.append(real_recv()) or received[-1]
        rewards = guard.score(items)
        assert (len(sent), len(received)) == (1, 1) and received == [256]
    assert rewards == [0.0 if i % 3 == 0 else 1.0 for i in range(256)]


def test_raising_item_scores_zero_and_is_counted():
    with RewardGuard("guard_rewards:exact_or_raise") as guard:
        assert guard.score([("1", "1"), ("raise", "raise"), ("2", "2"), ("3", "4")]) == [1.0, 0.0, 1.0, 0.0]
        assert (guard.errors, guard.timeouts, guard.restarts) == (1, 0, 0)


def test_hanging_item_is_killed_and_the_rest_are_scored():
    items = [("a", "a"), ("hang", "hang"), ("b", "b"), ("c", "x"), ("d", "d")]
    with RewardGuard("guard_rewards:hang_on", timeout=1.0) as guard:
        guard.score([("warm", "warm")])
        hung_pid = guard._proc.pid
        start = time.perf_counter()
        rewards = guard.score(items)
        elapsed = time.perf_counter() - start
        assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert (guard.errors, guard.timeouts, guard.restarts) == (0, 1, 1)
        assert_gone(hung_pid)
        assert guard.score([("e", "e")]) == [1.0]  # the restarted child keeps serving
        assert guard.restarts == 1
    assert 1.0 <= elapsed < 10.0, elapsed  # the 1 s deadline plus one child start-up


def test_deadline_is_per_call_not_per_batch():
    with RewardGuard("guard_rewards:sleeps", timeout=2.0) as guard:
        assert guard.score([("0.8", "")] * 4) == [1.0] * 4  # 3.2 s in all, each call well within 2 s
        assert (guard.errors, guard.timeouts, guard.restarts) == (0, 0, 0)


def test_hang_on_the_last_item_and_a_child_killed_while_idle_are_recovered():
    with RewardGuard("guard_rewards:hang_on", timeout=1.0) as guard:
        assert guard.score([("a", "a"), ("hang", "hang")]) == [1.0, 0.0]
        assert guard.score([("b", "b")]) == [1.0]
        assert (guard.timeouts, guard.restarts) == (1, 1)
        os.kill(guard._proc.pid, signal.SIGKILL)
        guard._proc.join()
        assert guard.score([("c", "c"), ("d", "x")]) == [1.0, 0.0]
        assert (guard.errors, guard.timeouts, guard.restarts) == (0, 1, 2)


def test_batches_larger_than_a_chunk():
    items = [(str(i), str(i)) for i in range(2500)]
    items[1500] = ("raise", "raise")
    with RewardGuard("guard_rewards:exact_or_raise") as guard:
        rewards = guard.score(items)
    assert rewards == [0.0 if i == 1500 else 1.0 for i in range(2500)]
    assert (guard.errors, guard.timeouts, guard.restarts) == (1, 0, 0)


def test_non_finite_and_non_numeric_rewards_count_as_errors():
    with RewardGuard("guard_rewards:returns_nan") as guard:
        assert guard.score([("nan", ""), ("ok", "")]) == [0.0, 1.0]
        assert guard.errors == 1
    with RewardGuard("guard_rewards:returns_text") as guard:
        assert guard.score([("text", "x"), ("inf", "x")]) == [0.0, 0.0]
        assert guard.errors == 2


def test_crashing_child_is_restarted_and_counted():
    with RewardGuard("guard_rewards:exit_on") as guard:
        assert guard.score([("a", "a"), ("die", "die"), ("b", "b")]) == [1.0, 0.0, 1.0]
        assert (guard.errors, guard.timeouts, guard.restarts) == (1, 0, 1)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo", "or an import path 'package.module:function'"),
        ("no_such_module_xyz.sub:fn", "module no_such_module_xyz.sub not found"),
        ("broken_reward:fn", "importing broken_reward failed: ModuleNotFoundError"),
        ("guard_rewards:missing", "guard_rewards has no attribute missing"),
        ("guard_rewards:not_callable", "not_callable is not callable"),
        (":fn", "or an import path 'package.module:function'"),
    ],
)
def test_bad_specs_are_user_errors_naming_the_spec(spec, message):
    with pytest.raises(UserError) as info:
        load_reward(spec)
    assert f"reward {spec!r}" in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=message):
        RewardGuard(spec)


def test_load_reward_resolves_builtin_and_import_paths():
    from asympo.rewards.exact import exact_match

    assert load_reward("exact") is exact_match
    assert load_reward("asympo.rewards.exact:exact_match") is exact_match


def test_child_that_fails_or_hangs_at_start_up_is_a_user_error_not_a_hang():
    with pytest.raises(UserError, match=r"reward 'fails_in_child:reward': .*cannot start here"):
        RewardGuard("fails_in_child:reward").score([("a", "a")])
    start = time.perf_counter()
    with pytest.raises(UserError, match="start-up timed out"):
        RewardGuard("hangs_in_child:reward", start_timeout=2.0).score([("a", "a")])
    assert time.perf_counter() - start < 10.0


def test_child_stays_light_although_the_parent_has_torch():
    assert "torch" in sys.modules  # conftest imports it
    with RewardGuard("guard_rewards:torch_loaded") as guard:
        assert guard.score([("", "")]) == [0.0]


def test_a_main_script_is_not_rerun_in_the_child(tmp_path):
    """Without the `if __name__ == "__main__"` idiom, plain spawn would re-run this script in the child."""
    script = tmp_path / "train_script.py"
    script.write_text(
        "from asympo.rewards.guard import RewardGuard\n"
        "print('ran')\n"
        "with RewardGuard('exact') as guard:\n"
        "    print(guard.score([('1', '1'), ('2', '3')]))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n") == ["ran", "[1.0, 0.0]", ""]


def test_close_terminates_the_child():
    guard = RewardGuard("exact")
    assert guard._proc is None  # started lazily
    guard.score([("1", "1")])
    proc = guard._proc
    guard.close()
    assert not proc.is_alive() and proc.exitcode == 0  # asked to leave, not killed
    assert_gone(proc.pid)
    guard.close()  # idempotent
