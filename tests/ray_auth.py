"""Ray with token auth, as Ray 2.60 runs by default, for tests that start a Ray of their own: the token is
in RAY_AUTH_TOKEN (nothing written to ~/.ray), so the training subprocesses join the test's Ray the way a
user joins a cluster."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from ray._private.authentication_test_utils import reset_auth_token_state  # Ray's own test helper

AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


@contextmanager
def token_auth() -> Iterator[None]:
    """AUTH in this process's environment while the block runs; the environment as it was afterwards."""
    saved = {k: os.environ.get(k) for k in AUTH}
    os.environ.update(AUTH)
    reset_auth_token_state()  # Ray read RAY_AUTH_* when it was imported: make it read them again
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()
