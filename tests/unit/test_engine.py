from __future__ import annotations

import torch

from asympo.config import SamplingConfig
from asympo.rollout.hf import HFEngine, sample_tokens


def test_greedy_matches_transformers_generate_token_for_token(small_model, tokenizer):
    engine = HFEngine(small_model, tokenizer)
    banned = [[tokenizer.pad_token_id], [tokenizer.bos_token_id], [tokenizer.unk_token_id]]
    for prompt in ["12+34=", "7-3+88=", "1="]:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref = small_model.generate(
            ids,
            max_new_tokens=10,
            do_sample=False,
            bad_words_ids=banned,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        ours = engine.generate_ids([ids[0].tolist()], SamplingConfig(temperature=0, max_new_tokens=10))[0][0]
        assert ours == ref[: len(ours)]
        if tokenizer.eos_token_id in ref:
            assert ours == ref[: ref.index(tokenizer.eos_token_id) + 1]


def test_batched_left_padding_gives_the_same_greedy_output_as_one_at_a_time(small_model, tokenizer):
    engine = HFEngine(small_model, tokenizer)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ["1+1=", "123+456-7=", "55="]]
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    batched = engine.generate_ids(prompts, greedy)[0]
    assert batched == [engine.generate_ids([p], greedy)[0][0] for p in prompts]


def test_samples_carry_version_reason_and_behaviour_logprobs(small_model, tokenizer):
    engine = HFEngine(small_model, tokenizer, version=7)
    groups = engine.generate(
        ["12+34=", "5-4="], 3, SamplingConfig(max_new_tokens=5), torch.Generator().manual_seed(0)
    )
    assert [len(g) for g in groups] == [3, 3]
    for g, group in enumerate(groups):
        for s in group:
            assert s.version == 7 and s.group == g
            assert len(s.behaviour_logprobs) == len(s.response_ids) <= 5
            assert all(lp <= 0 for lp in s.behaviour_logprobs)
            assert s.finish_reason == ("stop" if s.response_ids[-1] == tokenizer.eos_token_id else "length")
            assert tokenizer.pad_token_id not in s.response_ids


def test_eos_stops_a_sequence(small_model, tokenizer):
    """With the final norm zeroed every logit is 0; banned ids excluded, greedy picks the lowest id: EOS."""
    assert tokenizer.eos_token_id < min(tokenizer.unk_token_id, len(tokenizer) - 1)
    with torch.no_grad():
        small_model.model.norm.weight.zero_()
    engine = HFEngine(small_model, tokenizer)
    responses, _, reasons = engine.generate_ids(
        [[5, 6], [7]], SamplingConfig(temperature=0, max_new_tokens=6)
    )
    assert responses == [[tokenizer.eos_token_id]] * 2
    assert reasons == ["stop", "stop"]


def test_sampling_is_seeded_and_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    tokens, lps = sample_tokens(logits, SamplingConfig(top_p=0.7), g)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7; the tail is cut
    torch.testing.assert_close(lps, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[tokens])
    again, _ = sample_tokens(logits, SamplingConfig(top_p=0.7), torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    full, _ = sample_tokens(logits, SamplingConfig(), torch.Generator().manual_seed(1))
    frequencies = torch.bincount(full, minlength=4) / 2000
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)
