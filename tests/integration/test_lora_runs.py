"""LoRA in real runs, Ray actors and processes: `final/` loads with peft, a resume continues exactly, a Ray
rollout actor takes the adapters alone, and the bench measures one LoRA step against full fine-tuning (each
in a spawned process). The learner, the merged weights and the config: tests/unit/test_lora.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from asympo.config import TrainConfig
from asympo.models.device import CPU_FP32, engine_copy
from asympo.models.load import load_policy
from asympo.trainer import train
from tests.small_runs import read_metrics, small_config
from tests.unit.test_lora import LORA, lora_learner, one_step

peft = pytest.importorskip("peft")
TIMING = {"elapsed", "learn_time", "rollout_time", "rollout_tokens_per_s", "wait_time", "recompute_time"}


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
    from asympo.data.tasks import Problem
    from asympo.models.weights import pack_weights
    from asympo.rollout.hf import HFEngine
    from asympo.runtime.ray_backend import RolloutActor, put_version

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
        problems = [Problem(p, "") for p in prompts]
        version = [put_version(*pack_weights(adapters))]
        groups, _, _ = ray.get(actor.generate.remote(problems, 3, 1, version, 0.0))
    finally:
        ray.shutdown()
    for got, want in zip(groups, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.response_ids == b.response_ids and a.version == 1
            assert a.behaviour_logprobs == pytest.approx(b.behaviour_logprobs, abs=1e-5)


def test_the_bench_measures_one_lora_step_against_full_fine_tuning():
    from asympo.bench.lora import lora_memory

    r = lora_memory("tiny", 2, 16, rank=4, threads=1, steps=2, say=lambda *_: None)
    assert r["full"]["step_bytes"] > 0 and r["lora"]["step_bytes"] > 0
    assert all(r[k]["run_bytes"] >= r[k]["step_bytes"] for k in ("full", "lora"))
    assert 0 < r["lora"]["trainable"] < r["full"]["trainable"]
