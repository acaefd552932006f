"""DAPO's dynamic sampling (asympo.runtime.dynamic) and overlong shaping (asympo.rewards.shaping): the
definitions with prepared samples and the lag runtime's refills. Short real `asympo train` runs:
tests/integration/test_dynamic_sampling_runs.py."""

from __future__ import annotations

import copy

import pytest
import torch

from asympo.batch import make_batch
from asympo.config import ObjectiveConfig, RolloutConfig, TaskConfig, TrainConfig, build_config
from asympo.data.tasks import train_stream
from asympo.errors import UserError
from asympo.objectives import compute_loss
from asympo.objectives.common import LossInputs
from asympo.rewards.shaping import filter_truncated, overlong_penalty, shape_rewards
from asympo.rollout.base import Sample
from asympo.rollout.hf import HFEngine
from asympo.runtime import LagRuntime
from asympo.runtime.dynamic import step_batch


def sample(reward: float, length: int = 2, group: int = 0, reason: str = "stop") -> Sample:
    return Sample(
        prompt="1+1=",
        prompt_ids=[5, 6, 7],
        response_ids=[8] * length,
        text="2",
        finish_reason=reason,
        version=0,
        reward=reward,
        group=group,
    )


def batch_of(*groups: list[float]) -> list[Sample]:
    """One runtime batch: a group per list of rewards, numbered from 0 as the runtimes do."""
    return [sample(r, group=gid) for gid, rewards in enumerate(groups) for r in rewards]


class StandIn:
    """A runtime that hands over prepared batches, one per call, and records how it was called."""

    def __init__(self, *batches: list[Sample]):
        self.batches, self.calls = list(batches), []

    def next_batch(self, step: int, attempt: int = 0):
        self.calls.append((step, attempt))
        return self.batches[len(self.calls) - 1], {"rollout_time": 1.0, "buffer_groups": len(self.calls)}


class PlainStandIn:
    """A runtime whose next_batch takes only the step, as before dynamic sampling existed."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def next_batch(self, step: int):
        return self.samples, {}


def rollout(**kw) -> RolloutConfig:
    return RolloutConfig(**({"prompts_per_step": 3, "group_size": 2, "dynamic_sampling": True} | kw))


def groups_of(samples: list[Sample]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for s in samples:
        out.setdefault(s.group, []).append(s.reward)
    return out


def test_all_equal_groups_are_dropped_counted_and_refilled_with_unique_ids():
    runtime = StandIn(
        batch_of([0, 1], [1, 1], [0, 0]),  # one group with a spread, two without
        batch_of([0, 0], [1, 0], [0, 1]),  # two more: the target of 3 is met, one is surplus
    )
    samples, stats = step_batch(runtime, 7, rollout())
    assert runtime.calls == [(7, 0), (7, 1)]
    assert stats["groups_dropped"] == 3 and stats["sampling_rounds"] == 2 and stats["groups_kept"] == 3
    groups = groups_of(samples)
    assert sorted(groups) == [0, 1, 2]  # renumbered: unique across rounds
    assert all(len(set(rewards)) > 1 for rewards in groups.values())
    assert groups == {0: [0, 1], 1: [1, 0], 2: [0, 1]}  # in order; the last round's surplus trimmed
    assert stats["rollout_time"] == 2.0 and stats["buffer_groups"] == 2  # timings add up, counts are the last


def test_no_refill_when_the_first_round_is_full():
    runtime = StandIn(batch_of([0, 1], [1, 0], [0, 1]))
    samples, stats = step_batch(runtime, 0, rollout())
    assert runtime.calls == [(0, 0)] and len(samples) == 6
    assert (stats["groups_dropped"], stats["sampling_rounds"], stats["groups_kept"]) == (0, 1, 3)


def test_the_round_bound_holds_and_what_was_kept_is_trained_on():
    runtime = StandIn(*[batch_of([0, 0], [1, 0], [1, 1]) for _ in range(5)])
    samples, stats = step_batch(runtime, 3, rollout(dynamic_sampling_max_rounds=2))
    assert runtime.calls == [(3, 0), (3, 1)]  # never more than max_rounds
    assert stats["sampling_rounds"] == 2 and stats["groups_dropped"] == 4 and stats["groups_kept"] == 2
    assert groups_of(samples) == {0: [1, 0], 1: [1, 0]}


def test_when_nothing_is_kept_the_last_round_is_trained_on():
    last = batch_of([1, 1], [0, 0], [0, 0])
    runtime = StandIn(batch_of([0, 0], [0, 0], [0, 0]), last)
    samples, stats = step_batch(runtime, 0, rollout(dynamic_sampling_max_rounds=2))
    assert samples is last and stats["groups_kept"] == 0 and stats["groups_dropped"] == 6


def test_off_by_default_one_plain_call():
    assert not RolloutConfig().dynamic_sampling
    prepared = batch_of([1, 1], [0, 0])
    samples, stats = step_batch(PlainStandIn(prepared), 0, RolloutConfig())
    assert samples is prepared and "groups_dropped" not in stats


def test_shaping_comes_before_the_equality_check():
    # equal task rewards, different lengths: the overlong penalty gives the group a spread, so it is kept
    group = [sample(1.0, length=2), sample(1.0, length=8)]
    runtime = StandIn(group)
    cfg = rollout(prompts_per_step=1, max_new_tokens=8, overlong_buffer=4)
    samples, stats = step_batch(runtime, 0, cfg)
    assert stats["groups_kept"] == 1 and [s.reward for s in samples] == [1.0, 0.0]
    assert [s.extra["task_reward"] for s in samples] == [1.0, 1.0]
    assert stats["overlong_penalty_mean"] == -0.5


def test_overlong_penalty_follows_its_formula_at_the_edges():
    L_max, L_cache, factor = 16, 4, 0.5
    assert overlong_penalty(0, L_max, L_cache, factor) == 0.0
    assert overlong_penalty(L_max - L_cache, L_max, L_cache, factor) == 0.0  # the start of the ramp: 0
    assert overlong_penalty(L_max - L_cache + 1, L_max, L_cache, factor) == pytest.approx(-factor / L_cache)
    assert overlong_penalty(L_max - L_cache // 2, L_max, L_cache, factor) == pytest.approx(-factor / 2)
    assert overlong_penalty(L_max, L_max, L_cache, factor) == pytest.approx(-factor)  # at the cap
    assert overlong_penalty(L_max + 3, L_max, L_cache, factor) == -factor  # past the cap
    assert overlong_penalty(L_max, L_max, 0, factor) == 0.0  # buffer 0: off


def test_shaping_is_applied_once_and_off_by_default():
    s = sample(1.0, length=8)
    shape_rewards([s], RolloutConfig(max_new_tokens=8))
    assert s.reward == 1.0 and "task_reward" not in s.extra
    cfg = RolloutConfig(max_new_tokens=8, overlong_buffer=4, overlong_penalty=2.0)
    shape_rewards([s], cfg)
    shape_rewards([s], cfg)
    assert s.reward == -1.0 and s.extra["task_reward"] == 1.0


def test_overlong_buffer_must_be_below_the_cap():
    with pytest.raises(UserError, match="overlong_buffer.*max_new_tokens"):
        build_config(TrainConfig, None, ["rollout.max_new_tokens=8", "rollout.overlong_buffer=8"])
    cfg = build_config(TrainConfig, None, ["max_new_tokens=8", "overlong_buffer=7"])  # leaf names work too
    assert cfg.rollout.overlong_buffer == 7


def test_the_filter_masks_truncated_rows_and_keeps_the_others_advantages():
    samples = [
        sample(1.0, length=3, group=0),
        sample(0.0, length=8, group=0, reason="length"),
        sample(0.0, length=2, group=0),
        sample(1.0, length=8, group=1, reason="length"),
        sample(0.0, length=4, group=1),
    ]
    batch = make_batch(samples, 0, "group_norm")
    before = batch.advantages.clone()
    assert filter_truncated(batch, samples) == 2
    assert not batch.response_mask[[1, 3]].any() and batch.response_mask[[0, 2, 4]].any(-1).all()
    assert batch.advantages[[1, 3]].tolist() == [0.0, 0.0]
    assert torch.equal(batch.advantages[[0, 2, 4]], before[[0, 2, 4]])  # computed with the truncated ones
    assert filter_truncated(batch, [sample(1.0)] * len(samples)) == 0


@pytest.mark.parametrize("objective", ["pg", "asympo", "dapo", "dr_grpo"])
def test_a_filtered_row_adds_nothing_to_the_loss_or_its_gradient(objective):
    samples = [sample(1.0, length=3), sample(0.0, length=8, reason="length"), sample(0.0, length=2)]
    batch = make_batch(samples, 0, "group_norm")
    filter_truncated(batch, samples)
    logprobs = torch.full(batch.response_mask.shape, -1.0, requires_grad=True)

    def loss(b):
        inputs = LossInputs(
            logprobs=logprobs,
            mask=b.response_mask,
            advantages=b.advantages,
            group_ids=b.group_ids,
            behaviour_logprobs=torch.full(b.response_mask.shape, -1.0),
            total_responses=len(b),
            total_tokens=int(b.response_mask.sum()),
            max_len=8,
        )
        return compute_loss(inputs, ObjectiveConfig(name=objective))[0]

    value = loss(batch)
    value.backward()
    assert torch.isfinite(value) and not logprobs.grad[1].any() and logprobs.grad[0].any()
    everything = copy.deepcopy(batch)
    everything.response_mask[:] = False  # every response filtered: a zero loss, never nan
    logprobs.grad = None
    assert loss(everything).item() == 0.0


def test_lag_runtime_attempts_draw_fresh_batches_of_the_same_version(small_model, tokenizer):
    def runtime(seed=0):
        engine = HFEngine(copy.deepcopy(small_model), tokenizer)
        cfg = RolloutConfig(prompts_per_step=2, group_size=3, max_new_tokens=4)
        zero = lambda items: [0.0] * len(items)  # noqa: E731
        rt = LagRuntime(engine, train_stream(TaskConfig(), seed), zero, cfg, 1, seed)
        rt.publish(0, {k: v.clone() for k, v in small_model.state_dict().items()})
        return rt

    first, refill = runtime(), runtime()
    a, _ = first.next_batch(3)
    b, _ = refill.next_batch(3, attempt=0)  # the default: exactly what it always drew
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    c, _ = refill.next_batch(3, attempt=1)
    assert {s.version for s in b + c} == {0}  # the same version within a step: staleness stays exact
    assert [s.prompt for s in c] != [s.prompt for s in b]  # the next problems of the stream
    assert refill.cursor == 4  # every consumed problem counts, dropped or not
    again = runtime()
    again.next_batch(3)
    d, _ = again.next_batch(3, attempt=1)
    assert [s.response_ids for s in c] == [s.response_ids for s in d]  # deterministic for a seed
