"""Reward functions: text response + reference answer -> float."""
