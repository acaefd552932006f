"""What every rollout engine returns, and the interface the runtimes call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from asympo.config import SamplingConfig


@dataclass
class Sample:
    """One response. `behaviour_logprobs` serve the behaviour-corrected baselines and diagnostics only."""

    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    version: int
    behaviour_logprobs: list[float] | None = None
    answer: str = ""
    reward: float = 0.0
    group: int = 0
    extra: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    version: int

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> list[list[Sample]]:
        """`n` samples for each prompt, returned as one list (group) per prompt."""
        ...
