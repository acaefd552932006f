"""No process outlives its run: every process asympo starts ends when the process that started it dies.

A child calls `exit_with_parent()` first thing. A daemon thread then checks twice a second whether that
parent still lives (a zombie counts as dead); when it is gone, the child sends itself SIGTERM, which is its
clean way out (the training loop checkpoints, a worker releases its shared memory), and SIGKILL `grace`
seconds later if it is still there. Polling works whatever the parent's death (SIGKILL, the OOM killer, a
killed process group) and wherever the child was re-parented (init, a subreaper, torchrun's own
sessions), which a parent-death signal does not: Linux sends that one when the *thread* that forked exits.

Children started as commands (torchrun's ranks, `asympo train` runs of the bench) learn the pid to watch
from `ASYMPO_PARENT_PID`, which `child_env()` sets: a user's own `nohup asympo train &` watches nothing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

PARENT_ENV = "ASYMPO_PARENT_PID"
GRACE = 20.0  # seconds from SIGTERM to SIGKILL: a checkpoint of a large model takes a while
POLL = 0.5  # seconds between two looks at the parent


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (dead, not yet reaped by its own parent) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): signal 0 tells whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def exit_with(pid: int, grace: float = GRACE, poll: float = POLL) -> threading.Thread:
    """End this process when `pid` dies: SIGTERM, then SIGKILL after `grace` seconds."""

    def watch() -> None:
        while alive(pid):
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name=f"asympo-exit-with-{pid}", daemon=True)
    thread.start()
    return thread


def exit_with_parent(grace: float = GRACE) -> threading.Thread:
    """For a process asympo started with multiprocessing (its parent's pid comes with it) or with
    `child_env()` (the pid is in the environment); else the parent it has now."""
    parent = multiprocessing.parent_process()
    pid = parent.pid if parent is not None else int(os.environ.get(PARENT_ENV, os.getppid()))
    return exit_with(pid, grace)


def exit_with_launcher() -> threading.Thread | None:
    """For a command-line process: watch the process named by `ASYMPO_PARENT_PID` when asympo started this
    one (torchrun's ranks, the bench's runs); nothing otherwise."""
    pid = os.environ.get(PARENT_ENV)
    return exit_with(int(pid)) if pid and pid.isdigit() and int(pid) != os.getpid() else None


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a command asympo starts: this process is the one to outlive it by nothing."""
    return dict(os.environ if env is None else env) | {PARENT_ENV: str(os.getpid())}


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _processes() -> dict[int, tuple[int, int]]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            found[int(name)] = stat
    return found


def children(pid: int, marker: str = "") -> list[tuple[int, int]]:
    """(pid, start time) of `pid`'s live children whose command line holds `marker`."""
    found = []
    for child, (parent, started) in _processes().items():
        if parent == pid:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append((child, started))
            except OSError:
                continue
    return found


def reap_when_gone(watched: int, roots: list[tuple[int, int]]) -> None:
    """Start a small process of its own session that waits for `watched` to die, then ends `roots` (pid and
    start time, so a reused pid is never hit) and every process under them: SIGTERM, SIGKILL 5 s later.
    For services a library starts as our children and leaves running when we die (a local Ray)."""
    args = [str(watched), *(f"{pid}:{started}" for pid, started in roots)]
    subprocess.Popen(
        [sys.executable, "-m", "asympo.lifetime", *args],
        start_new_session=True,  # a kill of our process group must not take the reaper with it
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def _under(known: dict[int, int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """`known` (pid -> start time) as far as it still runs, with every process under it in `table`."""
    found = {pid: started for pid, started in known.items() if table.get(pid, (0, -1))[1] == started}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier and pid not in found}
        found |= {pid: table[pid][1] for pid in frontier}
    return found


def _reap(watched: int, roots: dict[int, int]) -> None:
    """The whole tree is looked at twice a second while `watched` lives: a library's services may die with
    their parent (Ray's fate sharing) and leave their own children re-parented, out of the tree."""
    known = dict(roots)
    while alive(watched):
        known = _under(known, _processes())
        if not known:
            return  # all of it ended first (a clean shutdown): nothing left to do
        time.sleep(POLL)
    targets = _under(known, _processes())
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_stat(pid) for pid in targets):
            time.sleep(0.1)


if __name__ == "__main__":
    watched_pid, *rest = sys.argv[1:]
    _reap(int(watched_pid), {int(p): int(s) for p, s in (item.split(":") for item in rest)})
