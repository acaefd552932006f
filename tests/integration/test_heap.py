"""The kept heap: a freed large block is reused by the next allocation instead of faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asympo.heap import keep_freed_memory

PROBE = """
import json, resource, torch
from asympo.heap import keep_freed_memory
kept = keep_freed_memory()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(10 << 20) for _ in range(3)]  # 3 x 40 MB: above glibc's largest mmap threshold
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": [faults_of_one_step() for _ in range(10)]}))
"""

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)


def probe(flag: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=os.environ | {"ASYMPO_KEEP_HEAP": flag},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_blocks_are_reused_without_page_faults():
    default, kept = probe("0"), probe("1")
    pages = 3 * (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert not default["kept"] and kept["kept"]
    # glibc's default gives each block back when freed, so every step faults all of its pages in again
    assert min(default["faults"]) > pages // 2
    # kept, the steps settle on reusing the same memory (aligned allocations take a few steps to find it)
    assert max(kept["faults"][-2:]) < pages // 20


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("ASYMPO_KEEP_HEAP", "0")
    assert keep_freed_memory() is False
