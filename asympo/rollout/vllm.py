"""In-process vLLM engine, for machines with a GPU (import-guarded: asympo works without vLLM).

Not run on the CPU-only machine this project is developed on: its tests drive the adapter with a stand-in
for the `vllm` module (a GPU cannot run here), so what they check is the mapping of settings, outputs and
weights, not vLLM itself. Weights reach vLLM's workers through a worker extension and `collective_rpc`,
which call the model's own `load_weights` with (name, tensor) pairs in Hugging Face naming.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from asympo.errors import UserError
from asympo.rollout.base import Sample, SamplingConfig

WORKER_EXTENSION = "asympo.rollout.vllm.WeightReceiver"


class WeightReceiver:
    """Mixed into each vLLM worker (`worker_extension_cls`): takes a new state dict from the learner."""

    def asympo_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        device = next(self.model_runner.model.parameters()).device
        self.model_runner.model.load_weights(weights=[(k, v.to(device)) for k, v in weights])
        return len(weights)


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise UserError("rollout.engine=vllm needs vLLM and a GPU: pip install vllm") from None


def model_path(name: str) -> str:
    """vLLM loads from a folder or a hub id: the built-in names map to the folders asympo keeps them in."""
    from asympo.models.load import gguf_cache_folder, load_policy, smollm2_gguf, tiny_checkpoint

    if name == "tiny":
        load_policy("tiny")  # makes the warm start if it is not there yet
        return str(tiny_checkpoint())
    if name == "smollm2" or name.endswith(".gguf"):
        gguf = smollm2_gguf() if name == "smollm2" else Path(name)
        load_policy(name)  # writes the safetensors cache once
        return str(gguf_cache_folder(gguf))
    return name


class VLLMEngine:
    """The RolloutEngine interface over `vllm.LLM`; samples carry vLLM's own token ids and log-probs."""

    def __init__(self, model: str, tokenizer, version: int = 0, return_logprobs: bool = True, **llm_kwargs):
        vllm = import_vllm()
        self.vllm, self.tokenizer, self.version, self.return_logprobs = (
            vllm,
            tokenizer,
            version,
            return_logprobs,
        )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # same process: no weights over a pipe
        if return_logprobs:  # after temperature, as the in-process engine and the learner compute them
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = vllm.LLM(model=model_path(model), worker_extension_cls=WORKER_EXTENSION, **llm_kwargs)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.llm.collective_rpc("asympo_load_weights", args=(list(state_dict.items()),))
        self.version = version

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> list[list[Sample]]:
        seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        params = self.vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            logprobs=0 if self.return_logprobs else None,  # 0: the sampled token's log-prob only
        )
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        groups = []
        for g, (prompt, ids, request) in enumerate(zip(prompts, prompt_ids, outputs, strict=True)):
            groups.append([self._sample(prompt, ids, out, g) for out in request.outputs])
        return groups

    def _sample(self, prompt: str, prompt_ids: list[int], out, group: int) -> Sample:
        token_ids = list(out.token_ids)
        logprobs = None
        if self.return_logprobs and out.logprobs is not None:
            logprobs = [step[token].logprob for step, token in zip(out.logprobs, token_ids, strict=True)]
        return Sample(
            prompt=prompt,
            prompt_ids=prompt_ids,
            response_ids=token_ids,
            text=out.text,
            finish_reason="stop" if out.finish_reason == "stop" else "length",
            version=self.version,
            behaviour_logprobs=logprobs,
            group=group,
        )
