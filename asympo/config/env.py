"""Multi-turn episodes (`env`): which environment answers the model's turns, and the episode's limits."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from asympo.config.base import Strict


class EnvConfig(Strict):
    """An environment turns a problem into an episode: it shows the first observation, answers each model
    turn (a tool result, feedback), and gives the reward. Unset (`name: null`), a problem is one prompt and
    one response scored by `reward`."""

    name: str | None = None
    """`calculator` (arithmetic with a `<calc>` tool), `guess` (guess a number, told higher or lower), or
    `package.module:Class` (see docs/environments.md); null: single-turn, scored by `reward`."""
    args: dict[str, Any] = {}
    """Keyword arguments for the environment's constructor, e.g. `env.args.low=1`."""
    max_turns: int = Field(4, ge=1)
    """Model turns per episode at most; the episode ends after the last one, scored as it stands."""
    max_tokens: int = Field(512, ge=2)
    """Longest episode (first observation and every turn) in tokens: a model turn stops there and an
    observation that would pass it ends the episode (`finish_reason` length)."""
    step_timeout: float = Field(5.0, gt=0)
    """Seconds a `reset` or `step` call may take; a slower one, like one that raises, ends its episode with
    reward 0, counted (`env_errors`, `env_timeouts`), and the run goes on."""
