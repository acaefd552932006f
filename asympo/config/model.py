"""The tiny built-in model's shape (asympo.models.tiny builds it)."""

from __future__ import annotations

from pydantic import Field

from asympo.config.base import Strict


class TinyModelConfig(Strict):
    """Shape of the tiny model; the defaults are ~1M parameters."""

    hidden_size: int = Field(128, gt=0)
    """Width of the residual stream (a multiple of `num_heads`)."""
    num_layers: int = Field(4, gt=0)
    """Decoder layers."""
    num_heads: int = Field(4, gt=0)
    """Attention (query) heads."""
    num_kv_heads: int = Field(2, gt=0)
    """Key/value heads (grouped-query attention; divides `num_heads`)."""
    intermediate_size: int = Field(384, gt=0)
    """Width of the MLP's hidden layer."""
    max_positions: int = Field(128, gt=8)
    """Longest sequence (prompt + response) the model can hold, in tokens."""
