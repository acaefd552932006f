"""bf16 linear layers with packed weights (asympo.rollout.packed): the same outputs as the plain layers,
packed copies that follow every change of the weights, and a model left as it was outside generation."""

from __future__ import annotations

import threading

import pytest
import torch

from asympo.config import SamplingConfig
from asympo.models.device import Placement, engine_copy
from asympo.rollout import packed
from asympo.rollout.hf import HFEngine

pytestmark = pytest.mark.skipif(not packed.available(), reason="no oneDNN bf16 on this CPU")
BF16 = Placement(torch.device("cpu"), "bf16")


@pytest.fixture()
def bf16_model(small_model):
    return engine_copy(small_model, BF16)


def test_packed_layers_compute_what_the_plain_ones_do(bf16_model):
    layers = packed.PackedLinears(bf16_model, rows_hint=4)
    assert layers.layers and all(m.weight.dtype == torch.bfloat16 for m in layers.layers)
    ids = torch.randint(1, 50, (3, 7))
    with torch.inference_mode():
        plain = bf16_model(input_ids=ids).logits
        with layers.active():
            assert all("forward" in m.__dict__ for m in layers.layers)
            fast = bf16_model(input_ids=ids).logits
        assert all("forward" not in m.__dict__ for m in layers.layers)  # the model is as it was
    assert len(layers.packed) == len(layers.layers)
    torch.testing.assert_close(
        fast, plain, atol=0.05, rtol=0
    )  # bf16: equal but for rounding of strided input


def test_packed_copies_follow_in_place_and_replaced_weights(bf16_model):
    layers = packed.PackedLinears(bf16_model, rows_hint=4)
    ids = torch.randint(1, 50, (2, 5))
    with torch.inference_mode(), layers.active():
        before = bf16_model(input_ids=ids).logits
    with torch.no_grad():
        for m in layers.layers[:-1]:
            m.weight.mul_(-1.5)  # in place: the same storage, a new version
        layers.layers[-1].weight = torch.nn.Parameter(layers.layers[-1].weight * 2)  # a new tensor
    with torch.inference_mode():
        plain = bf16_model(input_ids=ids).logits
        with layers.active():
            after = bf16_model(input_ids=ids).logits
    assert (after - before).abs().max() > 0.2  # several times the tolerance below
    torch.testing.assert_close(after, plain, atol=0.05, rtol=0)


def test_gradients_and_other_threads_take_the_plain_forward(bf16_model):
    layers = packed.PackedLinears(bf16_model, rows_hint=4)
    ids = torch.randint(1, 50, (2, 5))
    bf16_model.requires_grad_(True)  # an engine copy has none
    with layers.active():
        loss = bf16_model(input_ids=ids).logits.float().sum()  # grad mode: the packed op has no backward
        loss.backward()
    assert all(m.weight.grad is not None for m in layers.layers)
    outputs = []

    def elsewhere():
        with torch.inference_mode():
            outputs.append(bf16_model(input_ids=ids).logits)

    with torch.inference_mode(), layers.active():
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert len(outputs) == 1 and not layers.packed


def test_the_bf16_engine_packs_and_samples_what_the_unpacked_engine_samples(bf16_model, tokenizer):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    prompts = ["12+34=", "7-3=", "99+1=", "5+5+5="]
    runs = []
    for pack in (True, False):
        engine = HFEngine(bf16_model, tokenizer, max_batch=4)
        if not pack:
            engine.packed.layers = []
        runs.append(engine.generate(prompts, 2, sampling, torch.Generator().manual_seed(0)))
        assert bool(engine.packed.packed) == pack
    pairs = [(a, b) for g, h in zip(*runs, strict=True) for a, b in zip(g, h, strict=True)]
    same = [a.response_ids == b.response_ids for a, b in pairs]
    assert sum(same) >= len(same) - 1  # a bf16 rounding may tip one draw
    for (a, b), equal in zip(pairs, same, strict=True):
        if equal:
            torch.testing.assert_close(
                torch.tensor(a.behaviour_logprobs), torch.tensor(b.behaviour_logprobs), atol=0.05, rtol=0
            )


def test_float32_engines_are_left_unpacked(small_model, tokenizer):
    assert HFEngine(small_model, tokenizer).packed.layers == []
