"""LoRA through peft: a step changes only the adapters, engines get the merged model under the plain names,
`final/` loads with peft, a resume continues exactly, and a missing peft is a one-line error."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from asympo.bench.learner import synthetic_batch
from asympo.config import LoraConfig, OptimConfig, TrainConfig, build_config
from asympo.errors import UserError
from asympo.learner import Learner, publishable_weights
from asympo.lora import adapter_weights, merged_weights, plain_copy
from asympo.models.device import CPU_FP32, engine_copy
from asympo.models.load import load_policy
from asympo.objectives.common import ObjectiveConfig
from asympo.train import train
from tests.small_runs import read_metrics, small_config

peft = pytest.importorskip("peft")
LORA = LoraConfig(rank=4, alpha=8.0)
TIMING = {"elapsed", "learn_time", "rollout_time", "rollout_tokens_per_s", "wait_time", "recompute_time"}


def lora_learner(**optim) -> Learner:
    torch.manual_seed(0)
    model, _ = load_policy("tiny")
    return Learner(model, ObjectiveConfig(), OptimConfig(warmup_steps=0, lr=1e-2, **optim), lora=LORA)


def one_step(learner: Learner) -> dict:
    batch = synthetic_batch(learner.model.config.vocab_size, 8, 16)
    return learner.step(batch)


def test_a_lora_step_changes_only_the_adapters_and_the_merged_model_matches_peft():
    learner = lora_learner()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    trainable = {k for k, p in learner.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable)
    assert {id(p) for g in learner.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in learner.model.parameters() if p.requires_grad
    }
    one_step(learner)
    assert learner.version == 1
    after = learner.model.state_dict()
    for name, value in before.items():
        if name in trainable:
            continue
        assert torch.equal(after[name], value), name  # the frozen base: bit for bit
    assert any(not torch.equal(after[k], before[k]) for k in trainable if "lora_B" in k)

    reference = copy.deepcopy(learner.peft).merge_and_unload().state_dict()
    merged = learner.weights(torch.float32)
    assert merged.keys() <= reference.keys()
    for name, value in merged.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(merged[k], before[k.replace(".weight", ".base_layer.weight")]) for k in merged
               if k.replace(".weight", ".base_layer.weight") in before)  # fmt: skip


def test_merged_weights_have_the_plain_models_names_and_format():
    model, _ = load_policy("tiny")
    plain = publishable_weights(model, torch.bfloat16)
    learner = Learner(model, ObjectiveConfig(), OptimConfig(), lora=LORA)
    merged = merged_weights(learner.peft, torch.bfloat16)
    assert merged.keys() == plain.keys()
    for name, value in merged.items():
        assert (
            value.dtype == plain[name].dtype
            and value.shape == plain[name].shape
            and value.device.type == "cpu"
        )
        assert torch.equal(value, plain[name])  # B starts at zero: merged = base
    assert learner.weights(torch.float32).keys() == plain.keys()
    assert set(adapter_weights(learner.model)) == {
        k for k, p in learner.model.named_parameters() if p.requires_grad
    }


def test_engine_copies_are_plain_and_hold_the_merged_weights():
    learner = lora_learner()
    one_step(learner)
    merged = learner.weights(torch.float32)
    for copied in (engine_copy(learner.model, CPU_FP32), plain_copy(learner.model)):
        assert not hasattr(copied, "peft_config")
        state = copied.state_dict()
        assert not any("lora_" in k or "base_layer" in k for k in state)
        for name, value in merged.items():
            assert torch.equal(state[name], value), name
    # the learner's model still trains through its adapters
    assert any(".lora_" in k for k in learner.model.state_dict())


def test_missing_peft_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    model, _ = load_policy("tiny")
    with pytest.raises(UserError) as err:
        Learner(model, ObjectiveConfig(), OptimConfig(), lora=LORA)
    assert str(err.value) == "lora.rank > 0 needs peft: pip install 'asympo[lora]'"


def test_lora_config_keys_and_bounds():
    cfg = build_config(
        TrainConfig, overrides=["lora.rank=8", "lora.alpha=32", "lora.target_modules=[q_proj]"]
    )
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (8, 32.0, ["q_proj"])
    assert TrainConfig().lora.rank == 0  # off by default: full fine-tuning
    for bad in ("lora.rank=-1", "lora.alpha=0", "lora.dropout=1"):
        with pytest.raises(UserError):
            build_config(TrainConfig, overrides=[bad])


LORA_RUN = {
    "runtime": {"mode": "lag", "lag": 1},
    "task": {"test_size": 8},
    "optim": {"lr": 1e-2, "warmup_steps": 0},
    "lora": {"rank": 4},
}


def config(out, **extra) -> TrainConfig:
    return small_config(out, **(LORA_RUN | extra))


metrics = read_metrics


def test_a_lora_run_writes_a_final_folder_that_peft_loads(tmp_path):
    result = train(config(tmp_path, steps=2, save_model=True, checkpoint_every=0), quiet=True)
    assert result["version"] == 2
    final = tmp_path / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    base, _ = load_policy("tiny")
    loaded = peft.PeftModel.from_pretrained(base, final)
    merged = loaded.merge_and_unload().state_dict()
    plain = AutoModelForCausalLM.from_pretrained(final / "merged").state_dict()  # without peft
    for name, value in plain.items():
        torch.testing.assert_close(value, merged[name], rtol=1e-6, atol=1e-6)
    base2, _ = load_policy("tiny")
    assert any(not torch.equal(plain[k], v) for k, v in base2.state_dict().items())  # it learned


def test_lora_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    train(config(tmp_path / "straight", steps=4), quiet=True)
    train(config(tmp_path / "split", steps=2, checkpoint_every=2), quiet=True)
    model_file = load_file(tmp_path / "split" / "checkpoints" / "step-000002" / "model.safetensors")
    assert model_file and all(".lora_" in k for k in model_file)  # the adapters only
    result = train(config(tmp_path / "split", steps=4, checkpoint_every=2, resume=True), quiet=True)
    assert result["version"] == 4
    straight = {m["step"]: m for m in metrics(tmp_path / "straight")}
    split = metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(5))
    for m in split[:4]:
        for key in m.keys() - TIMING:
            assert m[key] == straight[m["step"]][key], (m["step"], key)


def test_ray_actors_take_the_adapters_alone_and_generate_as_the_merged_model():
    """An actor wraps its own base with the same LoRA config and loads only the adapter tensors; its samples
    match an in-process engine holding the merged weights."""
    ray = pytest.importorskip("ray")
    from asympo.config import RolloutConfig
    from asympo.rollout.hf import HFEngine
    from asympo.runtime.ray_backend import RolloutActor

    learner = lora_learner()
    one_step(learner)
    adapters = learner.adapters()
    assert adapters and all(".lora_" in k for k in adapters)
    _, tokenizer = load_policy("tiny")
    rollout = RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=6)
    prompts = ["12+7=", "3+4="]
    local = HFEngine(engine_copy(learner.model, CPU_FP32), tokenizer, version=1)
    expected = local.generate(prompts, 2, rollout, torch.Generator().manual_seed(3))
    base = HFEngine(load_policy("tiny")[0], tokenizer).generate(
        prompts, 2, rollout, torch.Generator().manual_seed(3)
    )
    assert [s.behaviour_logprobs for g in base for s in g] != [
        s.behaviour_logprobs for g in expected for s in g
    ]
    ray.init("local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = RolloutActor.remote("tiny", rollout, 1, True, "cpu", "fp32", LORA)
        groups, _ = ray.get(actor.generate.remote(prompts, 3, 1, [ray.put(adapters)]))
    finally:
        ray.shutdown()
    for got, want in zip(groups, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.response_ids == b.response_ids and a.version == 1
            assert a.behaviour_logprobs == pytest.approx(b.behaviour_logprobs, abs=1e-5)


def test_the_bench_measures_one_lora_step_against_full_fine_tuning():
    from asympo.bench.lora import lora_memory

    r = lora_memory("tiny", 2, 16, rank=4, threads=1, say=lambda *_: None)
    assert r["full"]["step_bytes"] > 0 and r["lora"]["step_bytes"] > 0
    assert 0 < r["lora"]["trainable"] < r["full"]["trainable"]
