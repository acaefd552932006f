from __future__ import annotations

import copy

import torch

from asympo.batch import make_batch
from asympo.config import ObjectiveConfig, OptimConfig, RolloutConfig, TaskConfig
from asympo.data.tasks import train_stream
from asympo.learner import Learner
from asympo.rewards.exact import exact_match
from asympo.rollout.base import Sample
from asympo.rollout.hf import HFEngine
from asympo.runtime import LagRuntime, runtime_lag
from asympo.runtime.buffer import StalenessBuffer


def score_exact(items):
    return [exact_match(text, answer) for text, answer in items]


def run_lagged(model, tokenizer, lag: int, steps: int, seed: int = 0):
    learner = Learner(model, ObjectiveConfig(name="pg"), OptimConfig(lr=1e-3))
    engine = HFEngine(copy.deepcopy(model), tokenizer)
    rollout = RolloutConfig(prompts_per_step=2, group_size=3, max_new_tokens=4)
    runtime = LagRuntime(engine, train_stream(TaskConfig(), seed), score_exact, rollout, lag, seed)
    runtime.publish(learner.version, learner.weights())
    snapshots, trace = {0: learner.weights()}, []
    for step in range(steps):
        samples, _ = runtime.next_batch(step)
        for s in samples:  # rewards from a rule the untrained model can satisfy, so there is a gradient
            s.reward = float(len(s.response_ids) % 2)
        trace.append(([s.version for s in samples], [s.response_ids for s in samples], learner.version))
        learner.step(make_batch(samples, tokenizer.pad_token_id, "group_norm"))
        runtime.publish(learner.version, learner.weights())
        snapshots[learner.version] = learner.weights()
    return trace, snapshots, runtime


def test_lag_uses_the_weights_of_exactly_k_versions_ago(small_model, tokenizer):
    k = 2
    trace, snapshots, runtime = run_lagged(small_model, tokenizer, k, steps=6)
    for versions, _, learner_version in trace:
        assert set(versions) == {max(0, learner_version - k)}
    assert len(runtime.history) == k + 1
    # the engine's weights are literally the published snapshot of that version
    engine_state = runtime.engine.model.state_dict()
    for name, value in snapshots[runtime.engine.version].items():
        assert torch.equal(engine_state[name], value)
    assert runtime.cursor == 6 * 2


def test_sync_is_lag_zero_and_on_policy(small_model, tokenizer):
    assert runtime_lag("sync", 5) == 0 and runtime_lag("lag", 5) == 5
    trace, _, _ = run_lagged(small_model, tokenizer, 0, steps=3)
    assert all(set(v) == {lv} for v, _, lv in trace)


def test_lag_runtime_is_deterministic_for_a_seed(small_model, tokenizer):
    a, _, _ = run_lagged(copy.deepcopy(small_model), tokenizer, 2, steps=4, seed=1)
    b, _, _ = run_lagged(copy.deepcopy(small_model), tokenizer, 2, steps=4, seed=1)
    c, _, _ = run_lagged(copy.deepcopy(small_model), tokenizer, 2, steps=4, seed=2)
    assert a == b
    assert a != c


def test_admission_counts_from_a_groups_oldest_token():
    """A group whose samples span versions 1..3 is as stale as its version-1 tokens."""

    def sample(version, token_versions=None):
        return Sample("p", [1], [2, 3], "t", "stop", version, token_versions=token_versions)

    buffer = StalenessBuffer(max_staleness=2)
    buffer.add([sample(3), sample(1, [1, 3])])  # oldest token: version 1
    buffer.add([sample(2), sample(2, [2, 3])])
    assert buffer.evict_stale(learner_version=4) == 1  # 4 - 1 > 2: the first group goes, the second stays
    assert len(buffer) == 1 and buffer.dropped == 1


def test_learner_scored_log_probs_over_kept_caches_get_a_note_at_the_start():
    """Only where a token can be drawn after a switch over older keys and values and the learner, not the
    engine, scores it for an objective that uses behaviour log-probs."""
    from asympo.config import TrainConfig, build_config
    from asympo.runtime import weight_switch_notes

    def notes(*overrides: str) -> list[str]:
        return weight_switch_notes(build_config(TrainConfig, overrides=list(overrides)))

    learner = ["objective.name=grpo", "behaviour.source=learner"]
    assert "inflight_kv=keep" in notes(*learner, "rollout.weight_updates=inflight")[0]
    assert notes(*learner, "runtime.mode=lag", "runtime.lag=2", "runtime.lag_switch_at=2")
    assert not notes(*learner, "rollout.weight_updates=inflight", "rollout.inflight_kv=recompute")
    assert not notes(*learner)  # weights taken between jobs: nothing is drawn across a switch
    assert not notes("objective.name=grpo", "rollout.weight_updates=inflight")  # the engine's log-probs
    assert not notes("objective.name=asympo", "behaviour.source=learner", "rollout.weight_updates=inflight")
