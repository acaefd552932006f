"""Exact-answer reward for the built-in task."""

from __future__ import annotations


def exact_match(response: str, answer: str) -> float:
    """1.0 iff the response, stripped of surrounding whitespace, is exactly the answer."""
    return 1.0 if response.strip() == answer.strip() else 0.0
