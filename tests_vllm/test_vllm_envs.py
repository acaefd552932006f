"""Multi-turn episodes on a real vLLM: prompts go in as token ids and vLLM's own ids come back, so the
learner trains on exactly what vLLM drew; the stop string that ends a tool call is kept; a run learns."""

from __future__ import annotations

import pytest
import torch

from asympo.config import EnvConfig, SamplingConfig, TrainConfig, build_config
from asympo.data.tasks import Problem
from asympo.envs.calculator import calculate
from asympo.envs.episodes import Episodes
from asympo.models.load import load_policy
from asympo.rollout.vllm import VLLMEngine

PROBLEMS = [Problem("12+34-5=", "41"), Problem("61-20+7=", "48"), Problem("9+80+3=", "92")]


class Recorder:
    """The engine, keeping what every continuation call returned."""

    def __init__(self, engine):
        self.engine, self.version, self.return_logprobs, self.drawn = engine, engine.version, True, []

    def continue_ids(self, *args, **kwargs):
        outs = self.engine.continue_ids(*args, **kwargs)
        self.drawn.append(outs)
        return outs


@pytest.fixture(scope="module")
def calc():
    model, tokenizer = load_policy("tiny-calc")
    engine = VLLMEngine(model, tokenizer, version=0, seed=0)
    yield engine, tokenizer
    engine.close()


def test_episodes_train_on_the_ids_vllm_drew(calc):
    engine, tokenizer = calc
    recorder = Recorder(engine)
    episodes = Episodes(EnvConfig(name="calculator"), tokenizer)
    groups = episodes.run(
        recorder, PROBLEMS, 8, SamplingConfig(max_new_tokens=24), torch.Generator().manual_seed(0)
    )
    samples = [s for g in groups for s in g]
    drawn = {tuple(o.ids) for call in recorder.drawn for o in call}
    tools = 0
    for s in samples:
        turns, current = [], []
        for token, model in zip(s.response_ids, s.model_mask, strict=True):
            if model:
                current.append(token)
            elif current:
                turns.append(current)
                current = []
        turns.append(current)
        assert all(tuple(t) in drawn for t in turns if t)  # every model turn is one continuation, as drawn
        if s.extra["env"].get("tool_calls"):
            tools += 1
            call = tokenizer.decode(turns[0])
            assert call.endswith("</calc>")  # the stop string stays in the turn
            expression = call.split("<calc>")[1].removesuffix("</calc>")
            assert calculate(expression) + "\n" in s.text
        model_logprobs = [lp for lp, m in zip(s.behaviour_logprobs, s.model_mask, strict=True) if m]
        assert all(lp < 0 for lp in model_logprobs)
    assert tools >= 2


def test_a_vllm_run_on_the_calculator_trains(tmp_path):
    from asympo.trainer import train

    overrides = [
        "model=tiny-calc", "env.name=calculator", "task.operands=3", "task.ops=+-", "rollout.engine=vllm",
        "rollout.max_new_tokens=24", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "runtime.mode=sync",
        "task.test_size=8", "eval_samples=1", "eval_every=0", "steps=3", "progress=false", "save_model=false",
        "checkpoint_every=0", f"out={tmp_path}",
    ]  # fmt: skip
    result = train(build_config(TrainConfig, None, overrides), quiet=True)
    assert result["version"] == 3 and "env_used_tool_after" in result
