"""What every rollout engine returns, and the interface the runtimes call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    version: int  # the policy version of its oldest token: what staleness is counted from
    behaviour_logprobs: list[float] | None = None
    answer: str = ""
    reward: float = 0.0
    group: int = 0
    extra: dict = field(default_factory=dict)
    # With in-flight weight updates (rollout.weight_updates=inflight) a response may span versions:
    token_versions: list[int] | None = None  # the version that produced each response token; None: `version`
    version_end: int | None = None  # the newest published version when it finished; None: `version`
    # A multi-turn episode (asympo.envs): the response holds the model's turns and the environment's replies;
    # True where the model produced the token (the loss covers those only). None: all the model's, one turn.
    model_mask: list[bool] | None = None

    @property
    def model_tokens(self) -> int:
        return len(self.response_ids) if self.model_mask is None else sum(self.model_mask)

    @property
    def newest_version(self) -> int:
        return max(self.token_versions) if self.token_versions else self.version

    @property
    def finished_version(self) -> int:
        return self.version if self.version_end is None else max(self.version_end, self.version)


# Called between decode steps when weights may change in flight: loads newer weights into the engine if any
# were published (through `load_weights`) and says whether it did.
Refresh = Callable[[], bool]


@dataclass
class Continuation:
    """What an engine appended to one token sequence: the ids exactly as drawn (token-in/token-out)."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    versions: list[int]  # the version that drew each token
    version_end: int  # the newest version loaded when it finished


class RolloutEngine(Protocol):
    version: int

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> list[list[Sample]]:
        """`n` samples for each prompt, returned as one list (group) per prompt."""
        ...

    def continue_ids(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        stops: Sequence[str] = (),
        budgets: list[int] | None = None,
    ) -> list[Continuation]:
        """One continuation per token sequence, ending at EOS, after a stop string (kept) or after its
        `budgets` entry of tokens: a model turn of a multi-turn episode (asympo.envs)."""
        ...
