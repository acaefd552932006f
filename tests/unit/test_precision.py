"""bf16 and devices on the CPU: the learner keeps float32 master weights and AdamW state while computing in
bf16, the engine keeps bf16 weights and a bf16 KV cache, both agree with float32 within bf16's precision,
`auto` picks by the rule it states, and asking for CUDA where there is none is a one-line error.

Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%). Logits of the tiny model reach
~10-20 in magnitude, so each can move by ~0.02-0.05 after a few layers of rounding, and a token's log-prob
(a difference of such numbers) by about as much; measured here: mean |diff| ~0.01, max ~0.2 over response
tokens. The tests allow mean 0.05 and max 0.6: several times what bf16 gives, far below what a wrong dtype
path gives (float32 weights read as bf16 bits, a dropped temperature, a missing softmax: errors of 1 and up).

Real runs in bf16 and the CLI's error for a missing CUDA: tests/integration/test_precision_runs.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import asympo.models.device as device_module
from asympo.batch import make_batch
from asympo.config import (
    ObjectiveConfig,
    OptimConfig,
    RuntimeConfig,
    SamplingConfig,
    TrainConfig,
    build_config,
)
from asympo.errors import UserError
from asympo.learner import Learner
from asympo.logprobs import token_logprobs
from asympo.models.device import (
    CPU_FP32,
    Placement,
    engine_copy,
    for_engine,
    resolve,
    resolve_device,
    resolve_precision,
)
from asympo.models.weights import publishable_weights
from asympo.rollout import batching
from asympo.rollout.hf import HFEngine
from asympo.runtime.devices import (
    activation_bytes,
    check_memory,
    engine_bytes,
    kv_cache_bytes,
    learner_bytes_to_come,
    worker_devices,
)

CPU = torch.device("cpu")
BF16 = Placement(CPU, "bf16", "test")
MEAN_TOL, MAX_TOL = 0.05, 0.6


def rollout(model, tokenizer, engine_placement=CPU_FP32, group=4, seed=0):
    engine = HFEngine(for_engine(copy.deepcopy(model), engine_placement), tokenizer)
    prompts = ["12+34=", "5-4+3=", "77=", "9+9="]
    groups = engine.generate(
        prompts, group, SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(seed)
    )
    samples = [s for g in groups for s in g]
    for i, s in enumerate(samples):
        s.reward = float(i % 3 == 0)
    return samples


@pytest.fixture(scope="module")
def tiny_model():
    from asympo.models.load import load_policy

    return load_policy("tiny")


@pytest.fixture()
def model_and_batch(small_model, tokenizer):
    samples = rollout(small_model, tokenizer)
    return small_model, make_batch(samples, tokenizer.pad_token_id, "group_norm")


def test_cpu_is_resolved_and_a_missing_cuda_is_a_user_error():
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():  # auto names the device's index, so it compares equal to cuda:N
        assert resolve_device("auto").index is not None
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == CPU
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match="device=cuda.*use device=cpu"):
            resolve_device(name)


def test_a_malformed_device_or_precision_is_a_config_error():
    with pytest.raises(UserError, match="device"):
        build_config(TrainConfig, overrides=["device=gpu"])
    with pytest.raises(UserError, match="precision"):
        build_config(TrainConfig, overrides=["precision=fp16"])
    with pytest.raises(UserError, match="worker_devices"):
        build_config(TrainConfig, overrides=["runtime.worker_devices=[cuda:x]"])
    cfg = build_config(
        TrainConfig, overrides=["device=cpu", "precision=bf16", "runtime.worker_devices=[cpu]"]
    )
    assert (cfg.device, cfg.precision, cfg.runtime.worker_devices) == ("cpu", "bf16", ["cpu"])


def test_auto_precision_follows_its_stated_rule(monkeypatch):
    assert resolve_precision("fp32", CPU, 4096, 10**9)[0] == "fp32"
    assert resolve_precision("bf16", CPU, 64, 10)[0] == "bf16"
    assert resolve_precision("auto", CPU, 128, 1_000_000) == (
        "fp32",
        "1.0M parameters: too small for bf16 to pay on a CPU",
    )
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda width: 6.0)
    chosen, why = resolve_precision("auto", CPU, 576, 135_000_000)
    assert chosen == "bf16" and "6.0x" in why and "576" in why
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda width: 0.5)  # an AVX2 CPU emulating bf16
    assert resolve_precision("auto", CPU, 576, 135_000_000)[0] == "fp32"


def test_the_cpu_bf16_measurement_is_a_real_ratio():
    speedup = device_module.cpu_bf16_speedup(64, rows=64, repeats=2)
    assert 0.01 < speedup < 100


def test_bf16_learner_keeps_float32_master_weights_and_adam_state(model_and_batch):
    model, batch = model_and_batch
    before = [p.detach().clone() for p in model.parameters()]
    learner = Learner(
        model, ObjectiveConfig(name="asympo"), OptimConfig(lr=1e-3, warmup_steps=0), placement=BF16
    )
    metrics = learner.step(batch)
    assert learner.version == 1 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    states = [s for s in learner.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    weights = learner.weights()  # what engines get: bf16, one embedding (the tied alias left out)
    assert all(t.dtype == torch.bfloat16 for t in weights.values() if t.is_floating_point())
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights


def test_bf16_logprobs_and_gradients_agree_with_float32(model_and_batch):
    model, batch = model_and_batch
    mask = batch.response_mask

    def logprobs_and_grads(placement):
        clone = copy.deepcopy(model)
        with placement.autocast():
            lp = token_logprobs(clone, batch.input_ids, batch.attention_mask, 0.8, mask)
        (lp[mask] * batch.advantages[:, None].expand_as(mask)[mask]).sum().backward()
        return lp.detach(), torch.cat([p.grad.flatten() for p in clone.parameters()])

    lp32, g32 = logprobs_and_grads(CPU_FP32)
    lp16, g16 = logprobs_and_grads(BF16)
    assert lp16.dtype == torch.float32  # log-softmax and the loss stay float32
    diff = (lp32 - lp16)[mask].abs()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0)
    assert cosine > 0.99, cosine
    assert 0.9 < g16.norm() / g32.norm() < 1.1


@pytest.mark.parametrize("keep", [True, False], ids=["softmax-kept", "recomputed"])
def test_the_chunked_head_under_autocast_matches_autograd_through_full_logits(
    model_and_batch, monkeypatch, keep
):
    """The hand-written head backward runs outside autocast: it must cast to bf16 itself and give the
    gradients autograd gives through the model's own (autocast) logits, on both of its paths."""
    model, batch = model_and_batch
    mask = batch.response_mask
    monkeypatch.setattr("asympo.logprobs.CHUNK_ELEMENTS", 5 * model.config.vocab_size)  # several chunks
    if not keep:
        monkeypatch.setattr("asympo.logprobs.KEEP_ELEMENTS", 0)
    chunked, plain = copy.deepcopy(model), copy.deepcopy(model)
    with BF16.autocast():
        lp_chunked = token_logprobs(chunked, batch.input_ids, batch.attention_mask, 1.0, mask)
        logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    lp_plain = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    lp_chunked[mask].sum().backward()
    lp_plain[mask].sum().backward()
    torch.testing.assert_close(lp_chunked[mask], lp_plain[mask], atol=0.05, rtol=0)
    for a, b in zip(chunked.parameters(), plain.parameters(), strict=True):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, atol=2e-2 * b.grad.abs().max().item() + 1e-6, rtol=0.05)


def test_the_bf16_engine_keeps_bf16_weights_and_kv_cache_and_float32_rotary(
    small_model, tokenizer, monkeypatch
):
    dtypes = []

    class Recording(batching.SlotCache):
        def _allocate(self, like, width):
            super()._allocate(like, width)
            dtypes.extend(t.dtype for pair in self.buffers for t in pair)

    monkeypatch.setattr("asympo.rollout.hf.SlotCache", Recording)
    engine_model = for_engine(copy.deepcopy(small_model), BF16)
    assert all(p.dtype == torch.bfloat16 for p in engine_model.parameters())
    assert engine_model.model.rotary_emb.inv_freq.dtype == torch.float32
    engine = HFEngine(engine_model, tokenizer)
    engine.generate(["12+34="], 4, SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0))
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_an_engine_copy_is_cast_tied_and_separate_from_the_learner(small_model, tokenizer):
    for placement in (BF16, CPU_FP32):
        copied = engine_copy(small_model, placement)
        assert all(p.dtype == placement.dtype and not p.requires_grad for p in copied.parameters())
        assert copied.lm_head.weight is copied.model.embed_tokens.weight  # still tied
        assert copied.model.rotary_emb.inv_freq.dtype == torch.float32
        with torch.no_grad():
            copied.model.norm.weight.fill_(3.0)  # its own storage: the learner's weights are untouched
        assert not torch.equal(small_model.model.norm.weight, copied.model.norm.weight.float())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in small_model.parameters())
    reference = for_engine(copy.deepcopy(small_model), BF16)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(engine_copy(small_model, BF16)(ids).logits, reference(ids).logits)


def test_bf16_engine_logprobs_match_the_float32_learner_within_bf16_precision(tiny_model):
    """The training-inference mismatch that feeds grpo's ratio: bf16 engine vs float32 learner."""
    model, tokenizer = tiny_model
    samples = rollout(model, tokenizer, BF16, group=8)
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    with torch.no_grad():
        learner = token_logprobs(model, batch.input_ids, batch.attention_mask)
    mask = batch.response_mask
    diff = (learner[mask] - batch.behaviour_logprobs[mask]).abs()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL
    assert diff.max() > 0  # bf16 really ran: float32 engines agree to ~1e-6


def test_bf16_engine_loads_published_weights_of_another_dtype(small_model, tokenizer):
    engine = HFEngine(for_engine(copy.deepcopy(small_model), BF16), tokenizer)
    trained = copy.deepcopy(small_model)
    with torch.no_grad():
        trained.model.norm.weight.mul_(2.0)
    engine.load_weights(publishable_weights(trained), version=3)  # float32 weights into a bf16 copy
    assert engine.version == 3 and engine.model.model.norm.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        engine.model.model.norm.weight.float(), trained.model.norm.weight, rtol=1e-2, atol=0
    )


def test_resolve_takes_the_model_size_into_account(small_model):
    placement = resolve("cpu", "auto", small_model)
    assert placement.precision == "fp32" and "too small" in placement.reason
    assert placement.describe().startswith("cpu fp32")


def test_async_workers_go_where_the_learner_is_unless_placed(small_model, monkeypatch):
    cfg = TrainConfig(runtime=RuntimeConfig(workers=2))
    assert worker_devices(cfg, BF16, small_model) == ["cpu", "cpu"]
    cfg = TrainConfig(runtime=RuntimeConfig(workers=3, worker_devices=["cpu"]))
    assert worker_devices(cfg, BF16, small_model) == ["cpu"] * 3
    # a learner on a GPU colocates its workers after the memory check (the device lookup and the free
    # memory are what only a GPU can answer: stood in for here)
    gpu = Placement(torch.device("cuda", 0), "bf16")
    monkeypatch.setattr("asympo.runtime.devices.resolve_device", torch.device)
    monkeypatch.setattr("asympo.runtime.devices.free_memory", lambda device: 80 << 30)
    assert worker_devices(TrainConfig(runtime=RuntimeConfig(workers=2)), gpu, small_model) == ["cuda:0"] * 2
    monkeypatch.setattr("asympo.runtime.devices.free_memory", lambda device: 1 << 10)
    with pytest.raises(UserError, match="runtime.mode=lag on one GPU"):
        worker_devices(TrainConfig(), gpu, small_model)
    cfg = TrainConfig(runtime=RuntimeConfig(worker_devices=["cuda:1"]))
    monkeypatch.setattr("asympo.runtime.devices.free_memory", lambda device: 80 << 30)
    assert worker_devices(cfg, gpu, small_model) == ["cuda:1"]  # another GPU: checked for its workers only
    monkeypatch.setattr(
        "asympo.runtime.devices.free_memory", lambda device: 1 << 40 if device.index == 0 else 1
    )
    with pytest.raises(UserError, match="cuda:1 has"):
        worker_devices(cfg, gpu, small_model)
    # Ray picks each actor's GPU: names only say "a GPU", and a GPU learner must place its actors
    ray = TrainConfig(runtime=RuntimeConfig(backend="ray", workers=2, worker_devices=["cuda:3", "cpu"]))
    assert worker_devices(ray, gpu, small_model, remote=True) == ["cuda", "cpu"]
    with pytest.raises(UserError, match="runtime.backend=ray.*runtime.worker_devices"):
        worker_devices(TrainConfig(runtime=RuntimeConfig(backend="ray")), gpu, small_model, remote=True)


def test_the_colocation_memory_check_refuses_what_does_not_fit(small_model):
    config = small_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    assert kv_cache_bytes(small_model, 4, 10, 2) == per_token * 40
    params = sum(p.numel() for p in small_model.parameters())
    assert engine_bytes(small_model, BF16, 4, 10) == params * 2 + per_token * 40
    checkpointed = activation_bytes(small_model, 1000, checkpointing=True, bf16=True)
    assert (
        0
        < checkpointed
        < activation_bytes(small_model, 1000, False, True)
        < activation_bytes(small_model, 1000, False, False)
    )
    cfg = TrainConfig()
    tokens = cfg.optim.micro_batch_size * (512 + cfg.rollout.max_new_tokens)
    assert learner_bytes_to_come(cfg, small_model, BF16) == (
        12 * params + activation_bytes(small_model, tokens, False, True) + 2 * params  # + the eval copy
    )
    recomputing = TrainConfig(behaviour={"source": "learner"})  # + the float32 scratch copy
    assert (
        learner_bytes_to_come(recomputing, small_model, BF16)
        == learner_bytes_to_come(cfg, small_model, BF16) + 4 * params
    )
    gib = 1 << 30
    check_memory(free=40 * gib, learner=20 * gib, workers=1, per_worker=10 * gib, device=CPU)
    with pytest.raises(UserError, match="runtime.mode=lag"):
        check_memory(free=40 * gib, learner=30 * gib, workers=1, per_worker=10 * gib, device=CPU)
    with pytest.raises(UserError, match="spread the workers"):  # a GPU with workers only
        check_memory(free=40 * gib, learner=0, workers=4, per_worker=10 * gib, device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_learner_step_and_engine(small_model, tokenizer):
    gpu = resolve("cuda", "auto", small_model)
    samples = rollout(small_model, tokenizer, gpu)
    batch = make_batch(samples, tokenizer.pad_token_id, "group_norm")
    learner = Learner(
        copy.deepcopy(small_model), ObjectiveConfig(name="asympo"), OptimConfig(), placement=gpu
    )
    metrics = learner.step(batch)
    assert learner.version == 1 and next(learner.model.parameters()).is_cuda
    assert torch.isfinite(torch.tensor(metrics["loss"]))
