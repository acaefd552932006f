"""Runtimes decide which policy version generates each batch: `sync`, `lag` and `async` (local worker
processes, a remote engine kept busy by a thread, or Ray actors), all behind the `Runtime` protocol (base.py);
build.py picks and builds one from a training config."""

from asympo.runtime.base import Runtime
from asympo.runtime.build import build_remote, build_runtime, runtime_lag, weight_switch_notes
from asympo.runtime.lag import LagRuntime
from asympo.runtime.local_async import AsyncRuntime
from asympo.runtime.remote_async import RemoteAsyncRuntime

__all__ = [
    "AsyncRuntime", "LagRuntime", "RemoteAsyncRuntime", "Runtime", "build_remote", "build_runtime",
    "runtime_lag", "weight_switch_notes",
]  # fmt: skip
