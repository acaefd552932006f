"""Environment code is the user's: a call that raises or outlives `env.step_timeout` costs its episode only.

Calls run on a daemon thread, one at a time, so the driver can stop waiting. A call that times out is left
running on its abandoned thread (Python cannot stop a thread) and a fresh thread takes the next call; a
daemon thread never holds up the process's exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class EnvCalls:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self._start()

    def _start(self) -> None:
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(self.inbox,), name="asympo-env", daemon=True).start()

    @staticmethod
    def _serve(inbox: queue.SimpleQueue) -> None:
        while True:
            fn, args, reply = inbox.get()
            try:
                reply.put((True, fn(*args)))
            except Exception as e:  # the episode's loss, never the run's
                reply.put((False, f"{type(e).__name__}: {e}".splitlines()[0][:200]))

    def __call__(self, fn: Callable, *args: Any) -> tuple[str | None, Any]:
        """(None, result), or ("error" | "timeout", why)."""
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self.inbox.put((fn, args, reply))
        try:
            ok, value = reply.get(timeout=self.timeout)
        except queue.Empty:
            self._start()  # the stuck thread keeps its call; the next one gets a new thread
            return "timeout", f"no answer in {self.timeout:g} s"
        return (None, value) if ok else ("error", value)
