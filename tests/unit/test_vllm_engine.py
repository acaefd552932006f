"""The vLLM engine adapter in the main environment, which has no vLLM.

The real tests run a real vLLM (the CPU build) in their own environment: tests_vllm/, by `./run test-vllm`.
Here stay two kinds of test: the missing-vLLM errors (real here: vLLM is absent), and a stand-in `vllm`
module for what only a GPU build does, which no machine of this project can run: a GPU platform keeps vLLM's
own memory settings, and GPU-only options (tensor parallelism) reach `vllm.LLM` untouched. The weight route
(files, `collective_rpc("reload_weights")`) is the same on both builds; the stand-in checks what it is sent.
The CLI's missing-vLLM error (a subprocess): tests/integration/test_vllm_engine_cli.py.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from asympo.config import SamplingConfig
from asympo.errors import UserError
from asympo.models.weights import publishable_weights
from asympo.rollout.vllm import VLLMEngine


@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class FakeLLM:
    """Records what the adapter asks of vLLM and answers in vLLM's output shapes."""

    kwargs: dict
    calls: list = field(default_factory=list)

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append(("generate", requests, params))
        lp = [{7: Logprob(-0.5)}, {8: Logprob(-1.0)}, {2: Logprob(-0.1)}]
        return [types.SimpleNamespace(outputs=[Completion([7, 8, 2], lp)] * p.n) for p in params]

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append((method, kwargs))
        folder = kwargs["weights_path"]
        self.loaded = load_file(f"{folder}/model.safetensors")  # read now: the folder is reused
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))

    @property
    def llm_engine(self):  # the version label vLLM puts on each token it draws
        return types.SimpleNamespace(set_weight_version=lambda v: self.calls.append(("weight_version", v)))


@pytest.fixture()
def gpu_vllm(monkeypatch):
    """A stand-in `vllm` on a GPU platform."""
    module = types.ModuleType("vllm")
    module.LLM = lambda **kwargs: FakeLLM(kwargs)
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    kinds = types.SimpleNamespace(FINAL_ONLY="final_only")
    module.sampling_params = types.SimpleNamespace(RequestOutputKind=kinds)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    return module


def test_without_vllm_the_engine_is_a_clear_error(monkeypatch, small_model, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match="needs vLLM: pip install vllm"):
        VLLMEngine(small_model, tokenizer)


def test_a_gpu_build_keeps_its_memory_settings_and_takes_gpu_options(gpu_vllm, small_model, tokenizer):
    engine = VLLMEngine(small_model, tokenizer, dtype=torch.bfloat16, tensor_parallel_size=2)
    kwargs = engine.llm.kwargs
    assert "kv_cache_memory_bytes" not in kwargs and kwargs["tensor_parallel_size"] == 2
    assert kwargs["dtype"] == "bfloat16" and kwargs["logprobs_mode"] == "processed_logprobs"
    assert kwargs["skip_tokenizer_init"] and kwargs["model"] == str(engine.folder)
    groups = engine.generate(["1+2=", "3+4="], 2, SamplingConfig(temperature=0.7), torch.Generator())
    assert engine.llm.calls[0] == ("weight_version", "0")
    _, requests, params = engine.llm.calls[1]
    assert [p.seed - params[0].seed for p in params] == [0, 2]  # each prompt's samples draw other seeds
    assert params[0].stop_token_ids == [tokenizer.eos_token_id] and params[0].logprobs == 0
    assert groups[1][0].behaviour_logprobs == [-0.5, -1.0, -0.1] and groups[1][0].finish_reason == "stop"
    published = {k: v * 2 for k, v in publishable_weights(small_model).items()}
    assert "lm_head.weight" not in published  # tied: the learner publishes the embedding alone
    engine.load_weights(published, 5)
    assert [c[0] for c in engine.llm.calls[-3:]] == ["reload_weights", "weight_version", "reset_prefix_cache"]
    loaded = engine.llm.loaded
    assert torch.equal(loaded["lm_head.weight"], 2 * small_model.get_output_embeddings().weight.detach())
    assert engine.version == 5
    folder = engine.folder
    engine.close()
    assert not folder.exists()


def test_the_engines_bench_without_the_vllm_environment_is_a_clear_error(tmp_path):
    from asympo.bench.engines import vllm_python

    with pytest.raises(UserError, match="./run test-vllm` builds .venv-vllm"):
        vllm_python(str(tmp_path / "missing/bin/python"))
