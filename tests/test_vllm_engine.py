"""The vLLM engine adapter. vLLM needs a GPU, which this machine lacks, so these tests drive the adapter with
a stand-in `vllm` module: they check how settings, outputs and weights are mapped, not vLLM itself."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from asympo.errors import UserError
from asympo.rollout.base import SamplingConfig
from asympo.rollout.vllm import WORKER_EXTENSION, VLLMEngine


@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class FakeLLM:
    """Records what the adapter asks of vLLM and answers in vLLM's output shapes."""

    model: str
    worker_extension_cls: str
    logprobs_mode: str = "raw_logprobs"  # vLLM's default: before temperature
    calls: list = field(default_factory=list)

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append(("generate", requests, params))
        outputs = []
        for r in requests:
            ids = r["prompt_token_ids"]
            completions = [
                Completion(
                    f"{len(ids)}+{k}",
                    [7, 8, 2],
                    "stop",
                    [{7: Logprob(-0.5)}, {8: Logprob(-1.0)}, {2: Logprob(-0.1)}],
                )
                for k in range(params.n)
            ]
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        return [len(args[0])]


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_without_vllm_the_engine_is_a_clear_error(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match="pip install vllm"):
        VLLMEngine("some/model", tokenizer)


def test_generate_maps_sampling_settings_and_outputs(fake_vllm, tokenizer):
    engine = VLLMEngine("some/model", tokenizer, version=3)
    assert engine.llm.model == "some/model" and engine.llm.worker_extension_cls == WORKER_EXTENSION
    assert engine.llm.logprobs_mode == "processed_logprobs"  # after temperature, as the learner scores them
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=5)
    groups = engine.generate(["1+2=", "10+20="], 3, sampling, torch.Generator().manual_seed(0))
    _, requests, params = engine.llm.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == [
        tokenizer("1+2=")["input_ids"],
        tokenizer("10+20=")["input_ids"],
    ]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.logprobs) == (
        3,
        0.7,
        0.9,
        5,
        0,
    )
    assert [len(g) for g in groups] == [3, 3]
    sample = groups[1][2]
    assert sample.prompt == "10+20=" and sample.group == 1 and sample.version == 3
    assert sample.response_ids == [7, 8, 2] and sample.behaviour_logprobs == [-0.5, -1.0, -0.1]
    assert sample.finish_reason == "stop" and sample.text == "6+2"
    again = VLLMEngine("some/model", tokenizer)
    again.generate(["1+2="], 3, sampling, torch.Generator().manual_seed(0))
    assert again.llm.calls[0][2].seed == params.seed  # the run's seed reaches vLLM's sampler


def test_weights_go_to_every_worker_with_their_version(fake_vllm, tokenizer, small_model):
    engine = VLLMEngine("some/model", tokenizer, return_logprobs=False)
    state = small_model.state_dict()
    engine.load_weights(state, 5)
    method, (pairs,) = engine.llm.calls[-1]
    assert method == "asympo_load_weights" and engine.version == 5
    assert [name for name, _ in pairs] == list(state)
    groups = engine.generate(["1+2="], 2, SamplingConfig(), None)
    assert groups[0][0].behaviour_logprobs is None and groups[0][0].version == 5


def test_train_runs_through_the_vllm_engine_in_lag_and_async(fake_vllm, tmp_path, monkeypatch):
    from asympo.config import TrainConfig, build_config
    from asympo.train import train

    engines = []
    monkeypatch.setattr(fake_vllm, "LLM", lambda **kw: engines.append(FakeLLM(**kw)) or engines[-1])
    for mode in ("lag", "async"):
        overrides = [f"runtime.mode={mode}", "rollout.engine=vllm", "steps=5", f"out={tmp_path / mode}"]
        overrides += [
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "task.test_size=4",
            "eval_samples=1",
        ]
        overrides += ["progress=false", "save_model=false", "checkpoint_every=0", "eval_every=0"]
        result = train(build_config(TrainConfig, None, overrides), quiet=True)
        assert result["steps"] == 5
        pushed = [call for call in engines[-1].calls if call[0] == "asympo_load_weights"]
        assert pushed, "the learner's weights never reached vLLM"


def test_the_cli_without_vllm_is_one_line_and_exit_2(tmp_path):
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asympo",
            "train",
            "rollout.engine=vllm",
            "runtime.mode=lag",
            f"out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip().endswith("pip install vllm")
    assert len(done.stderr.strip().splitlines()) == 1
