"""Faults a long run must survive: interrupts become a checkpoint, repeated failures a clean stop."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class RunAborted(Exception):
    """Failures went past a configured limit: the run stops with a final checkpoint and this message."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: the run saved a checkpoint and stopped; `resume=true` continues it."""

    def __init__(self, signal_name: str, step: int, checkpoint: object):
        super().__init__(f"{signal_name} at step {step}; checkpoint {checkpoint}; continue with resume=true")
        self.signal_name = signal_name


class StopWaiting(Exception):
    """A stop signal arrived while the runtime was waiting for rollouts: stop now, not after the batch."""


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can checkpoint and exit.

    A second signal while stopping falls back to the default behaviour (a user pressing Ctrl-C twice).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # type: ignore[arg-type]
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class SkipGuard:
    """Counts consecutive non-finite steps; past the limit the run is broken, not unlucky."""

    def __init__(self, limit: int):
        self.limit, self.consecutive = limit, 0

    def update(self, skipped: bool) -> None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.consecutive > self.limit:
            raise RunAborted(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient "
                f"(limit faults.max_skipped_steps={self.limit})"
            )
