"""asympo: asynchronous RL post-training with current-policy-only objectives (ASymPO, SPO)."""

__version__ = "0.1.0"
