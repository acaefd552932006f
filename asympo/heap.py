"""Keep freed memory in the process instead of handing it back to the kernel after every step.

glibc returns each large freed block (above its mmap threshold, at most 32 MB by default) to the kernel at
once, so every training step page-faults its activations, gradients and logits back in, and the kernel
zeroes each page again: on SmolLM2 at 4 x 256 tokens that was 150-380 thousand minor faults and 1-2 s of
system time per step. With the thresholds raised, later steps reuse the same memory and the faults stop
(`benchmarks/heap.py` measures both side by side). The price: the process keeps its peak footprint, which a
training run reaches every step anyway. `ASYMPO_KEEP_HEAP=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 512 << 20  # blocks below this come from the heap and are reused when freed
TRIM_THRESHOLD = (1 << 31) - 1  # free memory kept at the heap's top before any is given back
TOP_PAD = 256 << 20  # grow the heap in big steps: fewer brk calls while a step's peak builds up


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. False where that does not apply (not
    glibc, or turned off with ASYMPO_KEEP_HEAP=0); nothing else changes then."""
    if os.environ.get("ASYMPO_KEEP_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: their own allocator, left as it is
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
