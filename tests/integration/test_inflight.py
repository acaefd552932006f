"""In-flight weight updates (`rollout.weight_updates=inflight`): a response generated across a publish holds
tokens of both versions, recorded right; the async runtimes (local processes and Ray actors) pick up weights
between decode steps; the learner scores each segment under its own version; admission counts from the
oldest token; bad settings are one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_async import async_run

from asympo.config import SamplingConfig, TinyModelConfig
from asympo.models.load import load_policy
from asympo.models.tiny import build_model, build_tokenizer
from asympo.rollout.hf import HFEngine

# tiny-random never stops early, and 4 decoded at a time keep a job running long enough for publishes
SPANNING = {
    "prompts_per_step": 4,
    "group_size": 4,
    "max_new_tokens": 48,
    "max_batch": 4,
    "weight_updates": "inflight",
}
SWITCH = 2  # the refresh before the 2nd decode step loads version 2: two tokens come from version 1


def generate_across_a_publish(kv: str):
    """Six responses of the tiny model, version 1's weights swapped for version 2's (other, random weights)
    before the 2nd decode step; also returns both weight sets."""
    model, tokenizer = load_policy("tiny")
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = build_model(TinyModelConfig(), build_tokenizer(), seed=1).state_dict()
    engine = HFEngine(model, tokenizer, version=1, max_batch=8, inflight_kv=kv)
    calls = [0]

    def refresh() -> bool:
        calls[0] += 1
        if calls[0] == SWITCH:
            engine.load_weights(second, 2)
            return True
        return False

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16)
    groups = engine.generate(["12+7=", "40+9="], 3, sampling, torch.Generator().manual_seed(0), refresh)
    return [s for g in groups for s in g], model, tokenizer, first, second


def score(model, tokenizer, weights, sample) -> torch.Tensor:
    """Each response token's log-prob under `weights`, in one forward pass of prompt + response, with the
    special tokens the engine never draws masked as it masks them."""
    model.load_state_dict(weights)
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(sample.prompt_ids) - 1 : -1].float()
    logits[:, [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]] = float("-inf")
    picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]
    return picked


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_a_response_across_a_publish_records_each_tokens_version(kv):
    samples, model, tokenizer, first, second = generate_across_a_publish(kv)
    spanning = [s for s in samples if s.token_versions]
    assert spanning, "no response was live across the publish"
    for s in spanning:
        assert s.version == 1 and s.newest_version == 2 and s.version_end == 2
        switch = s.token_versions.index(2)
        assert s.token_versions == [1] * switch + [2] * (len(s.response_ids) - switch)
        assert switch == SWITCH  # drawn from the prefill and the 1st decode step: the first weights
        engine_lp = torch.tensor(s.behaviour_logprobs)
        under_first, under_second = score(model, tokenizer, first, s), score(model, tokenizer, second, s)
        # each token's engine log-prob is its own version's: the first segment exactly version 1's
        assert torch.allclose(engine_lp[:switch], under_first[:switch], atol=1e-4)
        assert not torch.allclose(engine_lp[switch:], under_first[switch:], atol=1e-2)
        if kv == "recompute":  # no key or value of version 1 is attended to again: exactly version 2's
            assert torch.allclose(engine_lp[switch:], under_second[switch:], atol=1e-4)
        else:  # keep: version 2's weights over version 1's keys and values (PipelineRL): close, not equal
            assert not torch.allclose(engine_lp[switch:], under_second[switch:], atol=1e-4)
    for s in samples:  # responses that began after the publish are version 2's alone
        if not s.token_versions:
            assert s.version in (1, 2) and s.newest_version == s.version


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_inflight_async_runs_have_responses_that_span_versions(tmp_path, backend):
    """tiny-random never stops early, so its responses run long enough for publishes to land inside them."""
    steps = async_run(
        tmp_path / "run",
        8,
        model="tiny-random",
        runtime={"mode": "async", "max_staleness": 2, "backend": backend},
        rollout=SPANNING,
    )
    assert [m["step"] for m in steps] == list(range(8))
    assert any(m["spanning_frac"] > 0 for m in steps), "no response spanned a publish"
    for m in steps:
        assert m["staleness_mean"] == pytest.approx(m["staleness_inflight_mean"] + m["staleness_queue_mean"])
        assert m["version_span_max"] <= m["staleness_inflight_max"] <= 2
        assert set(m["staleness_hist"]) <= {"0", "1", "2"}  # admission: the oldest token within the bound
    latencies = [m["publish_latency_p50"] for m in steps if m["publish_latency_p50"] is not None]  # NaN: null
    assert latencies and all(0 <= x < 10 for x in latencies)


def test_inflight_with_learner_behaviour_scores_each_segment_under_its_own_version(tmp_path):
    """grpo with behaviour log-probs recomputed by the learner: a spanning response is scored once per
    version it holds. With recompute, the engine's own log-probs (sent too, to compare) are each token's
    version's, so the learner's segment-wise scores match them. lr 1e-2 moves tiny-random's weights far at
    each step: scoring a whole response under its oldest version was ~5 nats off at most, segment-wise
    0.037, which is the engine's mask on special tokens (tiny-random gives them ~3% of its mass)."""
    steps = async_run(
        tmp_path / "run",
        6,
        model="tiny-random",
        objective={"name": "grpo"},
        optim={"lr": 1e-2},
        behaviour={"source": "learner", "compare": True},
        runtime={"mode": "async", "max_staleness": 2},
        rollout=SPANNING | {"inflight_kv": "recompute"},
    )
    assert any(m["spanning_frac"] > 0 for m in steps), "no response spanned a publish"
    assert any(m["recompute_passes"] > 1 for m in steps)  # some samples were scored under two versions
    for m in steps:
        assert m["behaviour_dropped"] == 0 and m["behaviour_lp_diff_max"] < 0.1


def test_between_jobs_responses_never_span(tmp_path):
    steps = async_run(
        tmp_path / "run",
        4,
        model="tiny-random",
        rollout=SPANNING | {"weight_updates": "between_jobs"},
    )
    assert all(m["spanning_frac"] == 0 and m["version_span_max"] == 0 for m in steps)
    for m in steps:  # published while generating is still counted, as inflight staleness
        assert m["staleness_mean"] == pytest.approx(m["staleness_inflight_mean"] + m["staleness_queue_mean"])


def lag_switch_run(out) -> list[dict]:
    lag = {"mode": "lag", "lag": 2, "lag_switch_at": 2}
    return async_run(out, 5, runtime=lag, rollout={"prompts_per_step": 8, "group_size": 4})  # lag, not async


def test_lag_switch_makes_every_live_response_span_k_versions_deterministically(tmp_path):
    """runtime.lag_switch_at: a lag-2 batch starts on version t-2 and loads version t before decode step 2,
    so every response longer than two tokens holds both; the same seed gives the same run."""
    steps = lag_switch_run(tmp_path / "a")
    for m in steps[2:]:  # from step 2, the batch's version is 2 behind the newest
        assert m["spanning_frac"] > 0.5 and m["version_span_max"] == 2 and m["staleness_queue_max"] == 0
        assert m["staleness_mean"] == pytest.approx(m["staleness_inflight_mean"] + m["staleness_queue_mean"])
    assert all(m["spanning_frac"] == 0 for m in steps[:1])  # version 0 is also the newest: nothing to load
    again = lag_switch_run(tmp_path / "b")
    timing = ("time", "elapsed", "per_s", "busy")
    strip = [{k: v for k, v in m.items() if not any(t in k for t in timing)} for m in steps]
    assert strip == [{k: v for k, v in m.items() if not any(t in k for t in timing)} for m in again]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollout.weight_updates=inflight", "rollout.engine=openai"], "rollout.engine=openai is a remote"),
        (
            ["rollout.weight_updates=inflight", "rollout.engine=vllm", "rollout.inflight_kv=recompute"],
            "inflight_kv=recompute is built for asympo's engine",
        ),  # fmt: skip
        (["rollout.weight_updates=inflight", "runtime.mode=lag"], "needs runtime.mode=async"),
        (["rollout.inflight_kv=recompte"], "inflight_kv"),
        (["runtime.lag_switch_at=2"], "runtime.lag_switch_at needs runtime.mode=lag"),
        (["runtime.mode=lag", "runtime.lag=0", "runtime.lag_switch_at=2"], "with runtime.lag > 0"),
        (["rollout.weight_updates=midway"], "weight_updates"),
    ],
)
def test_bad_inflight_settings_are_one_line_errors(tmp_path, args, message):
    run = subprocess.run(
        [sys.executable, "-m", "asympo", "train", f"out={tmp_path}", "steps=1", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
