"""The environment protocol: `reset` shows the first observation, `step` answers one model turn.

One environment object serves one episode, made fresh by calling the class (with `env.args`). It sees only
text (the turn's decoded tokens) and never token ids or log-probs: any engine can drive it, and the learner
trains on the ids the engine drew, not on a re-encoding of the text.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from asympo.data.tasks import Problem

Message = dict[str, Any]
Observation = str | list[Message]
"""Text appended to the episode as it is, or chat messages rendered by the model's chat template (the first
observation: the whole prompt; later ones: the turns after the model's, e.g. a `tool` or `user` message)."""


@dataclass
class Step:
    """What the environment says after a model turn. `observation` None (or `done`) ends the episode; the
    episode's reward is the sum of its steps' rewards."""

    observation: Observation | None = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)
    """Numbers summed over the episode and reported as `env_<key>` means (e.g. `tool_calls`)."""


class Environment(Protocol):
    stop: Sequence[str]
    """Strings that end a model turn besides EOS (e.g. `</calc>`: the tool call is complete)."""

    def reset(self, problem: Problem, seed: int) -> Observation:
        """Start an episode on `problem`; `seed` is the same for every episode of a group."""
        ...

    def step(self, text: str) -> Step | tuple[Observation | None, float, bool, dict]:
        """Answer one model turn: a `Step`, or the tuple (observation or None, reward, done, info)."""
        ...


def as_step(value: Any) -> Step:
    """Check what `step` returned; anything malformed is the environment's error (the episode is lost)."""
    if isinstance(value, tuple):
        if len(value) != 4:
            raise TypeError(
                f"step returned a tuple of {len(value)}, expected (observation, reward, done, info)"
            )
        value = Step(*value)
    if not isinstance(value, Step):
        raise TypeError(f"step returned {type(value).__name__}, expected a Step or a 4-tuple")
    if not isinstance(value.reward, numbers.Real) or not math.isfinite(value.reward):
        raise TypeError(f"step returned reward {value.reward!r}, expected a finite number")
    check_observation(value.observation, allow_none=True)
    info = value.info or {}
    if not isinstance(info, dict) or not all(
        isinstance(v, numbers.Real) and math.isfinite(v) for v in info.values()
    ):
        raise TypeError("step returned info that is not a dict of finite numbers")
    return Step(
        value.observation, float(value.reward), bool(value.done), {str(k): float(v) for k, v in info.items()}
    )


def check_observation(obs: Any, allow_none: bool = False) -> None:
    if obs is None and allow_none:
        return
    if isinstance(obs, str):
        return
    if isinstance(obs, list) and obs and all(isinstance(m, dict) and "role" in m for m in obs):
        return
    raise TypeError(f"an observation must be text or a non-empty list of chat messages, got {obs!r:.80}")
