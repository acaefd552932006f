"""Generation and weight updates through a real vLLM (one engine for the module, on the tiny model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asympo.config import SamplingConfig
from asympo.errors import UserError
from asympo.logprobs import token_logprobs
from asympo.rollout.vllm import VLLMEngine

PROMPTS = ["12+34=", "5+6=", "77+8="]
# vLLM and the learner both compute in float32 but with other kernels (oneDNN GEMMs, vLLM's attention) and
# other summation orders: measured here, the largest per-token difference was 4e-6 nats. 1e-4 leaves room
# for other CPUs while staying far below what a real fault gives (logits without temperature: ~0.1 nats at
# T=0.7; another version's weights: over 1 nat).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def engine(tiny):
    model, tokenizer = tiny
    engine = VLLMEngine(model, tokenizer, version=3, seed=0)
    yield engine
    engine.close()


def learner_logprobs(model, sample, temperature: float) -> torch.Tensor:
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    scored = token_logprobs(model, ids, torch.ones_like(ids), temperature=temperature)
    return scored[0, len(sample.prompt_ids) - 1 :]


def masked_logprobs(model, sample, temperature: float, banned: list[int]) -> torch.Tensor:
    """The behaviour policy as both engines sample it: banned special tokens (pad, bos, unk) masked out."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1].float() / temperature
    logits[:, banned] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]


def worst_difference(model, groups, temperature: float, banned: list[int] | None = None) -> float:
    worst = 0.0
    for sample in (s for g in groups for s in g):
        if banned is None:
            ours = learner_logprobs(model, sample, temperature)
        else:
            ours = masked_logprobs(model, sample, temperature, banned)
        theirs = torch.tensor(sample.behaviour_logprobs)
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_carry_ids_and_the_learners_logprobs(engine, tiny, temperature):
    model, tokenizer = tiny
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=8)
    groups = engine.generate(PROMPTS, 4, sampling, torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [4, 4, 4]
    for g, (prompt, group) in enumerate(zip(PROMPTS, groups, strict=True)):
        for s in group:
            assert s.prompt == prompt and s.group == g and s.version == 3
            assert s.prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert 1 <= len(s.response_ids) <= 8 and len(s.behaviour_logprobs) == len(s.response_ids)
            assert s.finish_reason == ("stop" if s.response_ids[-1] == tokenizer.eos_token_id else "length")
            assert s.text == tokenizer.decode(s.response_ids, skip_special_tokens=True)
    assert worst_difference(model, groups, temperature) < TOLERANCE
    # the warm-started model answers: most responses are digits ended by EOS
    assert sum(s.finish_reason == "stop" for g in groups for s in g) >= 6


def test_a_seed_repeats_and_a_groups_samples_differ(engine):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    first = engine.generate(PROMPTS, 4, sampling, torch.Generator().manual_seed(7))
    again = engine.generate(PROMPTS, 4, sampling, torch.Generator().manual_seed(7))
    ids = [[s.response_ids for s in g] for g in first]
    assert ids == [[s.response_ids for s in g] for g in again]
    long = engine.generate(["1+2="], 8, SamplingConfig(temperature=2.0, max_new_tokens=8), None)
    assert len({tuple(s.response_ids) for s in long[0]}) > 1  # vLLM gives each sample of a request a seed


def test_a_weight_update_changes_outputs_version_and_logprobs(engine, tiny):
    """The update flips the (tied) embedding: vLLM's untied head must follow it, as the learner's does."""
    from asympo.models.weights import publishable_weights

    model, _ = tiny
    if os.access("/dev/shm", os.W_OK):  # each version's file goes to memory, not to a disk
        assert engine.folder.parent == Path("/dev/shm"), engine.folder
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    before = engine.generate(PROMPTS, 2, sampling, torch.Generator().manual_seed(1))
    original = publishable_weights(model)
    changed = {
        k: (v.flip(0) if "embed_tokens" in k else v * 0.5 if "mlp" in k else v) for k, v in original.items()
    }
    try:
        model.load_state_dict(changed, strict=False)
        engine.load_weights(publishable_weights(model), 4)
        after = engine.generate(PROMPTS, 2, sampling, torch.Generator().manual_seed(1))
        assert engine.version == 4 and all(s.version == 4 for g in after for s in g)
        assert [[s.response_ids for s in g] for g in after] != [[s.response_ids for s in g] for g in before]
        # the changed model puts real mass on the banned tokens, which the learner's scores do not exclude
        assert worst_difference(model, after, 1.0, engine.banned) < TOLERANCE
    finally:
        model.load_state_dict(original, strict=False)
        engine.load_weights(publishable_weights(model), 3)
    restored = engine.generate(PROMPTS, 2, sampling, torch.Generator().manual_seed(1))
    assert [[s.response_ids for s in g] for g in restored] == [[s.response_ids for s in g] for g in before]


def test_a_partial_reload_loads_the_changing_blocks_and_keeps_the_rest(engine, tiny):
    """With `changing` (what LoRA sets), only the blocks of the changing weights are written and reloaded.
    One q_proj changes: vLLM fuses q, k and v, so their block goes whole, and k and v must come through
    intact; an embedding changed outside `changing` must not reach vLLM."""
    from asympo.models.weights import publishable_weights
    from asympo.rollout.vllm import changing_weights

    model, _ = tiny
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    original = publishable_weights(model)
    adapted = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    engine.changing = changing_weights(adapted, original)
    assert "model.layers.0.self_attn.k_proj.weight" in engine.changing
    assert "model.layers.0.mlp.up_proj.weight" not in engine.changing
    try:
        changed = {k: v * 1.5 if k in adapted else v for k, v in original.items()}
        model.load_state_dict(changed, strict=False)
        flipped = {k: v.flip(0) if "embed_tokens" in k else v for k, v in changed.items()}
        engine.load_weights(flipped, 4)  # the flipped embedding is not in `changing`: vLLM keeps its own
        assert {p.name for p in engine.update_folder.iterdir()} == {"config.json", "model.safetensors"}
        after = engine.generate(PROMPTS, 2, sampling, torch.Generator().manual_seed(1))
        assert worst_difference(model, after, 1.0, engine.banned) < TOLERANCE
    finally:
        model.load_state_dict(original, strict=False)
        engine.load_weights(original, 3)
        engine.changing = None
    again = engine.generate(PROMPTS, 2, sampling, torch.Generator().manual_seed(1))
    assert worst_difference(model, again, 1.0, engine.banned) < TOLERANCE


def test_a_misconfigured_engine_is_a_user_error(tiny):
    """vLLM's own checks fail before its engine process starts: one line, with vLLM's reason."""
    with pytest.raises(UserError, match="vLLM could not start the policy: .*max_model_len"):
        VLLMEngine(*tiny, max_model_len=100_000)  # tiny's context is 128 tokens


def test_without_vllm_the_engine_is_a_clear_error(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match="needs vLLM: pip install vllm"):
        VLLMEngine(*tiny)


def test_the_cli_without_vllm_is_one_line_and_exit_2(tmp_path):
    code = (
        "import sys; sys.modules['vllm'] = None; from asympo.cli import main; "
        f"sys.exit(main(['train', 'rollout.engine=vllm', 'runtime.mode=lag', 'out={tmp_path}']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs vLLM: pip install vllm" in lines[0]
