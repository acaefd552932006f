"""The objectives registry: each loss registers itself where it is defined, with what it needs.

    @register("spo", advantage="group_norm", aggregation="response")
    def spo(inputs: LossInputs, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]: ...

A name must also be listed in `asympo.config.objective.ObjectiveName` (the schema); a unit test checks that
the two agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import Tensor

from asympo.config import ObjectiveConfig
from asympo.objectives.common import LossInputs, ObjectiveError

LossFn = Callable[[LossInputs, ObjectiveConfig], tuple[Tensor, Tensor]]
DiagnosticsFn = Callable[[LossInputs, ObjectiveConfig], dict[str, Tensor]]


@dataclass(frozen=True)
class Objective:
    """A registry entry: the loss function plus what it needs and its defaults."""

    name: str
    fn: LossFn
    needs_behaviour: bool  # the rollout engine's (or the learner's recomputed) behaviour log-probs
    needs_proximal: bool  # a no-grad forward with the learner's weights at the start of the step
    default_advantage: str
    default_aggregation: str
    doc: str
    diagnostics: DiagnosticsFn | None = None  # objective-specific metrics (clip_frac, ratio_mean, ...)


OBJECTIVES: dict[str, Objective] = {}


def register(
    name: str,
    *,
    advantage: str,
    aggregation: str,
    needs_behaviour: bool = False,
    needs_proximal: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Register a loss under `name`; its docstring is its description."""

    def add(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip()
        OBJECTIVES[name] = Objective(name, fn, needs_behaviour, needs_proximal, advantage, aggregation, doc)
        return fn

    return add


def register_diagnostics(name: str) -> Callable[[DiagnosticsFn], DiagnosticsFn]:
    """Attach metrics to an objective registered above (logged every step, computed without gradient)."""

    def add(fn: DiagnosticsFn) -> DiagnosticsFn:
        OBJECTIVES[name] = replace(OBJECTIVES[name], diagnostics=fn)
        return fn

    return add


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ObjectiveError(f"unknown objective '{name}'; known: {', '.join(OBJECTIVES)}") from None
