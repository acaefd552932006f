"""Reward isolation: a reward that raises, hangs or crashes gives 0 and is counted, never stops training.

One persistent helper process (spawn, never fork: the parent holds torch threads) imports the reward by
spec and publishes each result in shared memory as soon as it is scored, with the time the next item
started, so the parent enforces a per-call deadline without a message per item, and kills a hung child.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import numbers
import signal
import sys
import time
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from asympo.errors import UserError  # asympo imports stay light here: the child imports this module
from asympo.lifetime import exit_with_parent
from asympo.specs import import_named

RewardFn = Callable[[str, str], float]  # (response_text, reference_answer) -> reward
CHUNK = 1024  # items per message; the shared array holds [items done, current item's start, results...]
NAMED = {  # short names for the built-in rewards
    "exact": "asympo.rewards.exact:exact_match",
    "math": "asympo.rewards.math:boxed_reward",
    "math-lenient": "asympo.rewards.math:lenient_reward",
    "math-format": "asympo.rewards.math:boxed_format_reward",
    "reasoning_gym": "asympo.rewards.rgym:reasoning_gym_reward",
}


def load_reward(spec: str) -> RewardFn:
    """Resolve a built-in name or "package.module:function" now, so a typo fails before anything spawns."""
    fn = import_named(f"reward {spec!r}", spec, NAMED, "function")
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {NAMED.get(spec, spec).partition(':')[2]} is not callable")
    return fn


def _serve(conn: Connection, state: Any, spec: str) -> None:
    """Child loop: import the reward, then score each batch into `state` and say when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    exit_with_parent(grace=2.0)  # a hung reward never reads the pipe's EOF: the parent's death ends it
    try:
        fn = load_reward(spec)
    except Exception as e:
        conn.send(("failed", str(e)))
        return
    if spec in NAMED:  # math-verify's first parse takes seconds: spend them in the start-up limit, not
        with contextlib.suppress(Exception):  # in a scored call's deadline (a correct answer timed out)
            fn("\\boxed{1}", "1")
    conn.send(("ready", None))
    with contextlib.suppress(EOFError, OSError):  # the parent is gone: leave quietly
        while (batch := conn.recv()) is not None:
            state[1] = time.monotonic()
            for index, (text, answer) in enumerate(batch):
                try:  # NaN marks an error; the parent also rejects inf, so no bad value reaches advantages
                    value = fn(text, answer)
                    state[2 + index] = float(value) if isinstance(value, numbers.Real) else math.nan
                except Exception:
                    state[2 + index] = math.nan
                state[1] = time.monotonic()  # the next item's start, published before the count,
                state[0] = index + 1  # so the parent never pairs a count with an older start time
            conn.send(len(batch))


class RewardGuard:
    """Scores (text, answer) pairs in a helper process; raises, hangs and crashes become counted zeros."""

    def __init__(self, spec: str, timeout: float = 5.0, start_timeout: float = 60.0) -> None:
        load_reward(spec)  # a bad spec is a UserError now, before any process exists
        self.spec, self.timeout, self.start_timeout = spec, timeout, start_timeout
        self.errors = self.timeouts = self.restarts = 0
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._state: Any = None

    def score(self, items: list[tuple[str, str]]) -> list[float]:
        """One reward per item; after a timeout or crash the child restarts and the rest are resubmitted."""
        rewards = [0.0] * len(items)
        pos = 0
        while pos < len(items):
            done, failure = self._run(items[pos : pos + CHUNK], rewards, pos)
            pos += done
            if failure is not None:  # the item at `pos` keeps its 0
                if failure == "timeout":
                    self.timeouts += 1
                else:
                    self.errors += 1
                pos += 1
        return rewards

    def _run(self, batch: list[tuple[str, str]], rewards: list[float], offset: int) -> tuple[int, str | None]:
        """Score one chunk; returns how many items were answered and why the next one failed, if it did."""
        if self._proc is not None and not self._proc.is_alive():  # died while idle: replace, count
            self._stop(graceful=False)
            self.restarts += 1
        conn = self._conn or self._start()
        state = self._state
        state[0], state[1] = 0, time.monotonic()
        done, failure = 0, None
        try:
            conn.send(batch)
            while True:  # sleep until the batch is done or the item in flight passes its deadline
                done = int(state[0])  # count first: the start time read after it is never older
                remaining = state[1] + self.timeout - time.monotonic()
                if remaining <= 0:
                    failure = "timeout"  # even if it answers just before the kill: it was late
                    break
                if conn.poll(remaining):
                    done = conn.recv()
                    break
        except (EOFError, OSError):  # the child died mid-item (segfault, os._exit, OOM kill)
            failure = "died"
        except BaseException:  # interrupted mid-batch: a child still scoring old items is out of sync
            self._stop(graceful=False)
            raise
        if failure is not None:
            self._stop(graceful=False)
            self.restarts += 1
            if failure == "died":
                done = int(state[0])  # exact now that the child is gone
            if done == len(batch):  # it failed after its last answer: no item to blame
                failure = None
        for index, value in enumerate(state[2 : 2 + done]):
            if not math.isfinite(value):
                self.errors += 1
            else:
                rewards[offset + index] = value
        return done, failure

    def _start(self) -> Connection:
        """Spawn the child and wait for it to import the reward, never longer than `start_timeout`."""
        ctx = mp.get_context("spawn")
        if self._state is None:  # kept across restarts; the child gets it at spawn, not by pickle
            self._state = ctx.RawArray("d", 2 + CHUNK)
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child_conn, self._state, self.spec), daemon=True)
        # Spawn re-runs the parent's main script in the child (torch: seconds; a crash without the
        # `if __name__ == "__main__"` idiom); a main spec named "__main__" makes it skip that.
        main = sys.modules["__main__"]
        saved, main.__spec__ = main.__spec__, ModuleSpec("__main__", None)
        try:
            self._proc.start()
        finally:
            main.__spec__ = saved
        child_conn.close()  # so the child's death reads as EOF here
        status, detail = "failed", f"helper process start-up timed out after {self.start_timeout:g}s"
        try:
            if self._conn.poll(self.start_timeout):
                status, detail = self._conn.recv()
        except (EOFError, OSError):
            detail = "helper process exited during start-up"
        if status == "ready":
            return self._conn
        self._stop(graceful=False)
        raise UserError(detail if detail.startswith("reward ") else f"reward {self.spec!r}: {detail}")

    def _stop(self, graceful: bool) -> None:
        """Ask an idle child to exit; kill one that is hung, dead or slow to leave. Always reaps it."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None or conn is None:
            return
        if graceful and proc.is_alive():
            with contextlib.suppress(OSError):
                conn.send(None)
                proc.join(10.0)  # an idle child leaves at once; a starved machine may take seconds
        if proc.is_alive():
            proc.kill()
        proc.join()
        conn.close()

    def close(self) -> None:
        """Stop the helper process; a later `score` would start a fresh one."""
        self._stop(graceful=True)

    def __enter__(self) -> RewardGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
