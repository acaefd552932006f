"""Continuous batching in HFEngine: the tokens of transformers' greedy `generate`, one prompt at a time or
many prompts through few slots; log-probs that a full forward pass reproduces; finish reasons and lengths."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from asympo.config import SamplingConfig
from asympo.models.load import load_policy
from asympo.rollout import batching
from asympo.rollout.hf import HFEngine, draw, sample_tokens

GREEDY = SamplingConfig(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation (and stalls when a core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_policy("tiny")
    rng = random.Random(0)
    texts = ["12+34=", "7-3+88=", "1=", "99+1=", "5+5+5+5=", "40-13="]
    texts += ["+".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 5))) + "=" for _ in range(14)]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return model, tokenizer, prompts


@pytest.fixture(scope="module")
def llama():
    """A random Llama with a 1000-token vocabulary. Its logits are scaled up, so greedy and low-temperature
    paths stay clear of ties; EOS is the token its greedy continuations produce most often, so some
    responses stop early and others run to the length limit."""
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(15)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 14, (20,), generator=gen).tolist()
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]
    prompts[5] = prompts[2]  # identical prompts share one prefill
    # Longer than the cache window can be when it arrives (at most 13 + 2 * 24 columns): the window must grow.
    prompts[9] = torch.randint(3, 1000, (70,), generator=gen).tolist()
    seen = Counter()
    for p in prompts:
        seen.update(set(reference_greedy(model, p, 24, eos=None, pad=0, banned=[0])))
    eos = seen.most_common(1)[0][0]
    # A tokenizer stand-in: the engine's token-level API reads only the special ids.
    tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=0, bos_token_id=None, unk_token_id=None)
    return model, tokenizer, prompts


def reference_greedy(model, prompt: list[int], max_new: int, eos: int | None, pad: int, banned: list[int]):
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new,
        suppress_tokens=banned,
        eos_token_id=eos,
        pad_token_id=pad,
    )[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def count_forwards(model, monkeypatch) -> list[tuple[int, int]]:
    """Record (rows, tokens per row) of every forward call."""
    calls = []
    forward = model.forward

    def counted(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return calls


@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_greedy_matches_transformers_generate_one_prompt_at_a_time(which, request):
    model, tokenizer, prompts = request.getfixturevalue(which)
    engine = HFEngine(model, tokenizer)
    stops = 0
    for p in prompts:
        ref = reference_greedy(model, p, 24, tokenizer.eos_token_id, tokenizer.pad_token_id, engine.banned)
        ours, _, reasons = engine.generate_ids([p], GREEDY)
        assert ours[0] == ref
        stops += reasons[0] == "stop"
    assert 0 < stops < len(prompts) or which == "tiny"  # the random model's lengths really vary


@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_continuous_batching_gives_the_one_at_a_time_greedy_tokens(which, request, monkeypatch):
    model, tokenizer, prompts = request.getfixturevalue(which)
    engine = HFEngine(model, tokenizer, max_batch=4)
    alone = [engine.generate_ids([p], GREEDY)[0][0] for p in prompts]
    relayouts = Counter()
    relayout = batching.SlotCache._relayout

    def counted(self, new_end):
        relayouts["grow left" if new_end > self.end else "move back"] += 1
        relayout(self, new_end)

    monkeypatch.setattr(batching.SlotCache, "_relayout", counted)
    calls = count_forwards(model, monkeypatch)
    batched, _, _ = engine.generate_ids(prompts, GREEDY)
    assert batched == alone
    assert max(rows for rows, _ in calls) <= 4
    assert len([width for _, width in calls if width > 1]) > 3  # prefills: slots were refilled
    if which == "llama":  # varied prompt and response lengths exercise both ways the window moves
        assert relayouts["grow left"] and relayouts["move back"]


def test_sampled_logprobs_match_a_full_forward_pass_under_continuous_batching(llama, monkeypatch):
    model, tokenizer, prompts = llama
    prompts = [p for p in prompts for _ in range(3)]  # groups, split across refills
    engine = HFEngine(model, tokenizer, max_batch=4)
    prefilled = []
    prefill = engine._prefill
    monkeypatch.setattr(
        engine, "_prefill", lambda batch, stash: prefilled.extend(batch) or prefill(batch, stash)
    )
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=20)
    responses, logprobs, _ = engine.generate_ids(prompts, sampling, torch.Generator().manual_seed(0))
    assert len({len(r) for r in responses}) > 1
    assert sorted(prefilled) == sorted({tuple(p) for p in prompts})  # each distinct prompt computed once
    with torch.no_grad():
        for prompt, response, lps in zip(prompts, responses, logprobs, strict=True):
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
            logits[:, engine.banned] = float("-inf")
            expected = torch.log_softmax(logits / sampling.temperature, -1)[range(len(response)), response]
            torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=0)


def test_finish_reasons_and_lengths(llama):
    model, tokenizer, prompts = llama
    eos = tokenizer.eos_token_id
    engine = HFEngine(model, tokenizer, max_batch=3)
    for sampling, seed in ((GREEDY, None), (SamplingConfig(temperature=0.3, max_new_tokens=24), 0)):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        responses, logprobs, reasons = engine.generate_ids(prompts, sampling, generator)
        assert {"stop", "length"} <= set(reasons)
        for response, lps, reason in zip(responses, logprobs, reasons, strict=True):
            assert len(lps) == len(response) <= sampling.max_new_tokens
            assert eos not in response[:-1] and tokenizer.pad_token_id not in response
            if reason == "stop":
                assert response[-1] == eos
            else:
                assert len(response) == sampling.max_new_tokens and response[-1] != eos


def test_sampling_is_reproducible_for_a_seed(llama):
    model, tokenizer, prompts = llama
    engine = HFEngine(model, tokenizer, max_batch=4)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    first = engine.generate_ids(prompts, sampling, torch.Generator().manual_seed(3))
    assert engine.generate_ids(prompts, sampling, torch.Generator().manual_seed(3)) == first
    assert engine.generate_ids(prompts, sampling, torch.Generator().manual_seed(4)) != first


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).repeat(20000, 1)
    tokens = draw(probs * 7, torch.Generator().manual_seed(0))  # unnormalised weights are fine
    frequencies = torch.bincount(tokens, minlength=6) / len(tokens)
    torch.testing.assert_close(frequencies, probs[0], atol=0.015, rtol=0)
    assert torch.equal(tokens, draw(probs * 7, torch.Generator().manual_seed(0)))


def test_no_prompts_and_bad_max_batch(llama):
    model, tokenizer, _ = llama
    assert HFEngine(model, tokenizer).generate_ids([], GREEDY) == ([], [], [])
    with pytest.raises(ValueError):
        HFEngine(model, tokenizer, max_batch=0)


def test_slot_cache_never_leaves_a_slot_with_nothing_to_attend_to():
    """A fully masked attention row can give NaN on some kernels, and a NaN in any column, masked or not,
    leaks into the output (0 * NaN): finished slots keep a column to read, fresh columns are zeros."""
    cache = batching.SlotCache(2, room=2)
    cache.insert(torch.tensor([0, 1]), [(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))])
    cache.retire([1])
    for step in range(8):  # the window moves back every 2 steps
        if step == 3:  # a short prompt: the window shrinks to it, dropping the finished slot's prompt
            cache.insert(torch.tensor([0]), [(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))])
        mask = cache.open_column()
        assert mask.any(1).all()
        cache.advance()
    assert cache.end == 1 + 5  # the window holds slot 0's new prompt and 5 steps: slot 1's prompt is gone
    keys, values = cache.buffers[0]
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()


def reference_draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Inversion of the whole float64 CDF at the same uniforms `draw` takes from the generator."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]


@pytest.mark.parametrize(
    "vocab", [49152, 1000, 997, 6]
)  # blocks of 256 / 40; a prime vocabulary is one block
def test_the_two_level_draw_inverts_the_same_cdf_as_one_float64_cumsum(vocab):
    gen = torch.Generator().manual_seed(2)
    weights = torch.randn(512, vocab, generator=gen).mul(4).exp()
    weights[torch.rand(512, vocab, generator=gen) < 0.3] = 0.0  # zeros, whole zero blocks at the end
    weights[:, vocab // 2 :] *= torch.rand(512, 1, generator=gen) < 0.5
    weights[:, 0], weights[:, 1] = 0.0, 1.0  # no row is all zeros
    tokens, total = draw(weights, torch.Generator().manual_seed(7), with_total=True)
    assert torch.equal(tokens, reference_draw(weights, torch.Generator().manual_seed(7)))
    assert (weights.gather(-1, tokens[:, None]) > 0).all()
    torch.testing.assert_close(total, weights.double().sum(-1), rtol=1e-12, atol=0)


def test_sampled_logprobs_are_the_temperature_scaled_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5000, generator=gen) * 5
    logits[:, :3] = float("-inf")  # banned
    for temperature in (1.0, 0.6):
        sampling = SamplingConfig(temperature=temperature)
        tokens, lps = sample_tokens(logits, sampling, torch.Generator().manual_seed(1))
        assert (tokens >= 3).all() and lps.dtype == torch.float32
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(lps, expected, atol=1e-5, rtol=0)
        assert torch.isfinite(logits).sum() == 64 * 4997  # the caller's logits are left as they were
