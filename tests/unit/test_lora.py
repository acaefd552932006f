"""LoRA through peft: a step changes only the adapters, engines get the merged model under the plain names,
and a missing peft is a one-line error. Real runs (`final/` loads with peft, a resume continues exactly), Ray
actors and the memory bench (a process per variant): tests/integration/test_lora_runs.py."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from asympo.batch import synthetic_batch
from asympo.config import LoraConfig, ObjectiveConfig, OptimConfig, TrainConfig, build_config
from asympo.errors import UserError
from asympo.learner import Learner
from asympo.models.device import CPU_FP32, engine_copy
from asympo.models.load import load_policy
from asympo.models.lora import adapter_weights, merged_weights, plain_copy
from asympo.models.weights import publishable_weights

peft = pytest.importorskip("peft")
LORA = LoraConfig(rank=4, alpha=8.0)


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


def test_a_step_changes_only_the_adapted_weights_and_vllm_writes_their_blocks():
    """What vLLM's engine writes per version under LoRA: the adapted layers' weights change and nothing
    else does; their blocks (every weight of each adapted layer's parent) are what it writes."""
    from asympo.models.lora import adapted_weights
    from asympo.rollout.vllm import changing_weights

    learner = lora_learner()
    before = learner.weights(torch.float32)
    one_step(learner)
    after = learner.weights(torch.float32)
    adapted = adapted_weights(learner.model)
    assert adapted and adapted <= before.keys()
    assert {k for k in before if not torch.equal(before[k], after[k])} <= adapted
    blocks = changing_weights(adapted, before)
    assert adapted <= blocks
    assert not any("embed" in k or "norm" in k.rsplit(".", 2)[-2] for k in blocks)
    partial = changing_weights({"model.layers.0.self_attn.q_proj.weight"}, before)
    assert partial == {k for k in before if k.startswith("model.layers.0.self_attn.")}
    assert {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"} <= partial


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


def _loss_and_grads(model: torch.nn.Module, batch, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = torch.log_softmax(logits.float(), -1).mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_in_place_adapter_layers_give_peft_outputs_and_gradients(autocast):
    """asympo's LoRA Linear adds the adapter into the frozen output in place (less activation churn): the
    logits and every adapter gradient equal peft's own layer, in float32 and under bf16 autocast."""
    from peft.tuners.lora.layer import Linear

    from asympo.models.lora import apply_lora
    from asympo.models.lora_linear import InPlaceLinear

    torch.manual_seed(0)
    base, _ = load_policy("tiny")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(ours, LORA)
    config = peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules="all-linear")
    peft.get_peft_model(theirs, config)
    layers = [m for m in ours.modules() if isinstance(m, Linear)]
    assert layers and all(type(m) is InPlaceLinear for m in layers)
    assert not any(type(m) is InPlaceLinear for m in theirs.modules())
    adapters = {k: p for k, p in theirs.named_parameters() if p.requires_grad}
    with torch.no_grad():  # peft starts B at zero: give B values so the adapters' outputs count
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if p.requires_grad:
                adapters[name].copy_(p)
    batch = synthetic_batch(base.config.vocab_size, 4, 12)
    logits, grads = _loss_and_grads(ours, batch, autocast)
    logits_peft, grads_peft = _loss_and_grads(theirs, batch, autocast)
    assert grads.keys() == grads_peft.keys() and len(grads) == 2 * len(layers)
    # bf16: the two paths round the adapter's sum differently (one addmm against a matmul, a scale, an add),
    # so a logit may differ by one bf16 step: 1/16 for |logit| < 16
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    logit_tol = dict(rtol=1.6e-2, atol=0.0625) if autocast else tol
    torch.testing.assert_close(logits.float(), logits_peft.float(), **logit_tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_peft[name], **tol, msg=name)
