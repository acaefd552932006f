"""The process census: every integration test's processes must be gone a few seconds after it ends.

Each test body runs with a marker of its own in the environment (`ASYMPO_CENSUS`), which every process it
starts inherits (rollout workers, torchrun ranks, Ray's services and actors, helpers, servers). After the
test and its fixtures are torn down, no live process may still carry it. Fixtures of a wider scope start
before the marker is set, so a module's shared server is not counted against the test that first used it.
"""

from __future__ import annotations

import uuid

import pytest

from tests.census import MARK, SETTLE, settle


@pytest.fixture(autouse=True)
def census(monkeypatch):
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    yield mark
    left = settle(mark)
    assert not left, f"processes of this test still alive {SETTLE:g} s after it ended:\n" + "\n".join(left)
