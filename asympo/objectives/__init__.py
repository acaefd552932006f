"""The objectives: current-policy ones (current.py) and behaviour-corrected baselines (behaviour.py), each
registered where it is defined (registry.py), and `compute_loss` (loss.py), the one entry point the learner
calls."""

from asympo.objectives.common import LossInputs, ObjectiveError
from asympo.objectives.loss import CURRENT_POLICY, advantage_method, compute_loss
from asympo.objectives.registry import OBJECTIVES, Objective, get_objective

__all__ = [
    "CURRENT_POLICY", "OBJECTIVES", "LossInputs", "Objective", "ObjectiveError", "advantage_method",
    "compute_loss", "get_objective",
]  # fmt: skip
