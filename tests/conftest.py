from __future__ import annotations

import pytest
import torch

from asympo.config import TinyModelConfig
from asympo.models.tiny import build_model, build_tokenizer

torch.set_num_threads(2)

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def small_model(tokenizer):
    """A randomly initialised, very small model: real transformers code, milliseconds per call."""
    return build_model(SMALL, tokenizer, seed=0)
