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
    `package.module:Class` (see docs/environments.md); null: single-turn, scored by `reward`. Set for you to
    `task.name` when that is a `verifiers:` taskset, whose environment runs the episodes."""
    args: dict[str, Any] = {}
    """Keyword arguments for the environment's constructor, e.g. `env.args.low=1`; with a verifiers
    taskset, keys of its environment's config (`env.args.max_rounds=3`)."""
    max_turns: int = Field(4, ge=1)
    """Model turns per episode at most; the episode ends after the last one, scored as it stands."""
    max_tokens: int = Field(512, ge=2)
    """Longest episode (first observation and every turn) in tokens: a model turn stops there and an
    observation that would pass it ends the episode (`finish_reason` length)."""
    step_timeout: float = Field(5.0, gt=0)
    """Seconds a `reset` or `step` call may take; a slower one, like one that raises, ends its episode with
    reward 0, counted (`env_errors`, `env_timeouts`), and the run goes on."""


VERIFIERS = "verifiers:"


def verifiers_env(task_name: str, task_options: dict[str, Any], env: EnvConfig) -> EnvConfig:
    """A `verifiers:` task brings its environment: `env.name` follows `task.name`, and the taskset's options
    (`task.options`) go to the environment's taskset config, so both load the same tasks."""
    if not task_name.startswith(VERIFIERS):
        if env.name and env.name.startswith(VERIFIERS):
            raise ValueError(f"env.name={env.name}: a verifiers environment is named by task.name instead")
        return env
    if env.name not in (None, task_name):
        raise ValueError(f"task.name={task_name} runs its own environment: leave env.name unset")
    return env.model_copy(update={"name": task_name, "args": {**env.args, "taskset": dict(task_options)}})
