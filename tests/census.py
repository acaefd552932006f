"""Test helper: which processes a test started, found by the marker each test's environment carries (set by
the census fixture in tests/integration/conftest.py and inherited by every process the test starts)."""

from __future__ import annotations

import os
import time
from pathlib import Path

MARK = "ASYMPO_CENSUS"
SETTLE = 15.0  # seconds the test's processes get to leave after it ends
# a library's per-process service that a test started in the test runner itself lives as long as the runner,
# by design, and ends with it: multiprocessing's resource tracker, wandb's service (it watches `--pid`)
RUNNER_SERVICES = (b"multiprocessing.resource_tracker", b"wandb-core")


def marked(mark: str) -> list[str]:
    """`pid command` of every live process whose environment carries this marker (zombies excluded)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
            if stat[0] == "Z":
                continue
            raw = (entry / "cmdline").read_bytes()
            if int(stat[1]) == os.getpid() and any(s in raw for s in RUNNER_SERVICES):
                continue
            command = raw.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name} {command[:160]}")
        except OSError:  # it left while we looked
            continue
    return found


def settle(mark: str, seconds: float = SETTLE) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left
