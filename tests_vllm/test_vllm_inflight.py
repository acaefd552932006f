"""In-flight weight updates through a real vLLM (`rollout.weight_updates=inflight`, keep): a response
generated across a load holds tokens of both versions, labelled right by vLLM; an async run picks up
weights between vLLM's decode steps."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from asympo.config import SamplingConfig, TinyModelConfig, TrainConfig, build_config
from asympo.models.tiny import build_model, build_tokenizer
from asympo.models.weights import publishable_weights
from asympo.rollout.vllm import VLLMEngine

TOLERANCE = 1e-4  # vLLM's float32 log-probs against the learner's (see test_vllm_engine.py)


def score(model, weights, sample, banned: list[int]) -> torch.Tensor:
    """Each response token's log-prob under `weights` (banned tokens masked, as both engines mask them)."""
    model.load_state_dict(weights, strict=False)
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1].float()
    logits[:, banned] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]


def test_a_response_across_an_inflight_load_records_each_tokens_version(tiny):
    """Random weights (version 1) give way to the trained tiny model's (version 2) after vLLM's 2nd step.
    vLLM's engine core decodes in a process of its own, ahead of the steps read here, so version 1 must
    write long responses: random weights rarely draw EOS (the trained model answers in 3-5 tokens, which
    the core could finish before the load)."""
    model, tokenizer = build_model(TinyModelConfig(), build_tokenizer(), seed=1), build_tokenizer()
    first = publishable_weights(model)
    second = publishable_weights(copy.deepcopy(tiny[0]))
    engine = VLLMEngine(model, tokenizer, version=1, seed=0)
    try:
        calls = [0]

        def refresh() -> bool:
            calls[0] += 1
            if calls[0] == 2:
                engine.load_weights(second, 2)
                return True
            return False

        sampling = SamplingConfig(temperature=1.0, max_new_tokens=48)
        groups = engine.generate(["12+7=", "40+9="], 3, sampling, torch.Generator().manual_seed(0), refresh)
        samples = [s for g in groups for s in g]
        spanning = [s for s in samples if s.token_versions]
        assert spanning, "no response was live across the load"
        for s in spanning:
            assert s.version == 1 and s.newest_version == 2 and s.version_end == 2
            switch = s.token_versions.index(2)
            assert switch >= 1 and s.token_versions == [1] * switch + [2] * (len(s.response_ids) - switch)
            engine_lp = torch.tensor(s.behaviour_logprobs)
            under_first = score(model, first, s, engine.banned)
            # the first segment is exactly version 1's; the rest was drawn by version 2's weights, over
            # the keys and values version 1 computed (keep), so it is no longer version 1's
            assert torch.allclose(engine_lp[:switch], under_first[:switch], atol=TOLERANCE)
            assert not torch.allclose(engine_lp[switch:], under_first[switch:], atol=1e-2)
        assert [v for v, _ in engine.first_tokens] == [2]  # publish-to-use: one load, used once

        later = engine.generate(["12+7="], 2, sampling, torch.Generator().manual_seed(1), refresh)
        for s in later[0]:  # after the call: version 2 alone, and exactly version 2's log-probs
            assert s.version == 2 and s.token_versions is None
            under_second = score(model, second, s, engine.banned)
            assert torch.allclose(torch.tensor(s.behaviour_logprobs), under_second, atol=TOLERANCE)
    finally:
        engine.close()


def test_an_inflight_async_run_has_responses_that_span_versions(tmp_path):
    """tiny-random never stops early, so its responses run long enough for publishes to land inside them."""
    from asympo.trainer import train

    overrides = [
        "model=tiny-random", "rollout.engine=vllm", "runtime.mode=async", "runtime.max_staleness=2",
        "rollout.weight_updates=inflight", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "rollout.max_new_tokens=48", "steps=6", f"out={tmp_path}", "task.test_size=4", "eval_samples=1",
        "progress=false", "save_model=false", "checkpoint_every=0", "eval_every=0",
    ]  # fmt: skip
    result = train(build_config(TrainConfig, None, overrides), quiet=True)
    assert result["steps"] == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6
    assert any(m["spanning_frac"] > 0 for m in steps), "no response spanned a publish"
    latencies = [m["publish_latency_p50"] for m in steps if m["publish_latency_p50"] is not None]  # NaN: none
    assert latencies and all(0 < x < 5 for x in latencies)  # from a publish to vLLM's next decode step
    for m in steps:
        assert m["staleness_mean"] == pytest.approx(m["staleness_inflight_mean"] + m["staleness_queue_mean"])
        assert m["version_span_max"] <= m["staleness_inflight_max"] <= 2
        assert set(m["staleness_hist"]) <= {"0", "1", "2"}
