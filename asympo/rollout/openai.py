"""Rollouts from any OpenAI-compatible server (`asympo serve`, vLLM, SGLang, ...) through `/v1/completions`.

Text in, text out: no log-probs are asked for, so objectives that need behaviour log-probs get them from the
learner (`behaviour.source=learner`). The learner's tokenizer re-tokenizes prompt and response to fill the
token ids, and an EOS is appended when the server says the response stopped, as the in-process engine keeps
the EOS it sampled: both engines give the learner the same shape of sample.

The prompts of a call are split into `concurrency` requests sent at once (the server batches them), each with
a seed drawn from the caller's generator, so a seeded run repeats when the server honours per-request seeds
(`asympo serve` does for requests batched the same way: always with `concurrency=1`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from asympo.config import OpenAIEngineConfig, SamplingConfig
from asympo.rollout.base import Continuation, Sample
from asympo.rollout.client import ApiClient, ServerRejected
from asympo.rollout.weight_sync import NoSync, WeightSync, make_sync


class OpenAIEngine:
    def __init__(
        self,
        cfg: OpenAIEngineConfig,
        tokenizer: PreTrainedTokenizerBase,
        sync: WeightSync | None = None,
        version: int = -1,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.return_logprobs = False  # text only: behaviour log-probs come from the learner
        self.client = ApiClient(cfg.base_url, cfg.api_key_env, cfg.timeout, cfg.retries, cfg.backoff)
        self.sync = sync if sync is not None else make_sync(cfg.weight_sync, self.client)
        self.version = version  # the version last loaded: pushed to the server, or just recorded (NoSync)
        self.weights: dict[str, torch.Tensor] | None = None  # kept to push again after a server restart
        self.repushes = 0  # times the server came back with other weights and got ours again
        self.eos_id = tokenizer.eos_token_id
        self._model = cfg.served_model or None
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="asympo-openai")

    def __repr__(self) -> str:
        return f"OpenAIEngine({self.client!r}, version={self.version})"

    @property
    def model(self) -> str:
        """The configured served model, or the first one the server lists."""
        if self._model is None:
            listed = self.client.get("/models").get("data") or []
            if not listed or not isinstance(listed[0], dict) or "id" not in listed[0]:
                raise ServerRejected(
                    f"{self.client.base_url}/models lists no model: set rollout.openai.served_model"
                )
            self._model = str(listed[0]["id"])
        return self._model

    @property
    def retries(self) -> int:
        return self.client.retried

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        if version != self.version:
            self.sync.push(state_dict, version)
            self.version = version
        self.weights = state_dict

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> list[list[Sample]]:
        if not prompts:
            return []
        model = self.model  # resolved once, before the requests go out in parallel
        size = math.ceil(len(prompts) / min(self.cfg.concurrency, len(prompts)))
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        seeds = torch.randint(0, 2**31 - 1, (len(chunks),), generator=generator).tolist()
        replies = self._send(lambda i: self._complete(model, chunks[i], n, sampling, seeds[i]), len(chunks))
        groups: list[list[Sample]] = []
        for chunk, reply in zip(chunks, replies, strict=True):
            groups.extend(self._groups(chunk, n, reply, first=len(groups)))
        return groups

    def continue_ids(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        stops: Sequence[str] = (),
        budgets: list[int] | None = None,
    ) -> list[Continuation]:
        """Multi-turn episodes, text only: each sequence goes out as token ids (one request each, sent
        `concurrency` at a time), and the reply's text is tokenized once, here. Those ids are what the
        learner trains on; they can differ from the ones the server drew where the text encodes differently
        (a server that returns only text cannot say).

        Stop strings are applied here, to the text: servers differ in whether and how they say which stop
        ended a completion (`stop_reason`, `matched_stop`, nothing), and the environment must see it. The
        server decodes on to the turn's budget, which costs time, not correctness."""
        if not prompts:
            return []
        model = self.model
        budgets = budgets or [sampling.max_new_tokens] * len(prompts)
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        payloads = [
            {"prompt": [ids], "max_tokens": budget, "seed": seed}
            for ids, budget, seed in zip(prompts, budgets, seeds, strict=True)
        ]
        replies = self._send(lambda i: self._complete(model, [], 1, sampling, 0, payloads[i]), len(prompts))
        return [self._continuation(reply, stops) for reply in replies]

    def _continuation(self, reply: dict[str, Any], stops: Sequence[str]) -> Continuation:
        choice = reply["choices"][0]
        text = choice.get("text") or ""
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        ends = [text.find(stop) + len(stop) for stop in stops if stop in text]
        if ends:  # cut after the first stop string, kept: the environment reads it
            text, reason = text[: min(ends)], "stop"
        ids = self._ids(text)
        if reason == "stop" and not ends and self.eos_id is not None:  # the server stopped at EOS
            ids.append(self.eos_id)
        version = reply.get("policy_version")
        version = version if isinstance(version, int) else self.version
        return Continuation(ids, [0.0] * len(ids), reason, [version] * len(ids), version)

    def _send(self, request: Callable[[int], dict[str, Any]], count: int) -> list[dict[str, Any]]:
        """`count` requests in parallel; those answered by other weights than ours are sent again, once,
        after pushing ours again (the server restarted, or someone else reloaded it)."""
        replies: list[dict[str, Any]] = [{}] * count
        todo = list(range(count))
        for attempt in range(2):
            for i, reply in zip(todo, self._pool.map(request, todo), strict=True):
                replies[i] = reply
            todo = [i for i in todo if self._lost_weights(replies[i])]
            if not todo:
                break
            if attempt:  # pushed again and still other weights: someone else is loading this server
                version = replies[todo[0]].get("policy_version")
                raise ServerRejected(
                    f"the server generates with version {version} right after a push of {self.version}"
                )
            self.sync.push(self.weights, self.version)
            self.repushes += 1
        return replies

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _lost_weights(self, reply: dict[str, Any]) -> bool:
        reported = reply.get("policy_version")
        pushing = self.weights is not None and not isinstance(self.sync, NoSync)
        return pushing and reported is not None and reported != self.version

    def _complete(
        self,
        model: str,
        prompts: list[str],
        n: int,
        sampling: SamplingConfig,
        seed: int,
        override: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload = {
            "model": model,
            "prompt": prompts,
            "n": n,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
        } | (override or {})
        reply = self.client.post_json("/completions", payload)
        choices, expected = reply.get("choices"), len(payload["prompt"]) * n
        if not isinstance(choices, list) or len(choices) != expected:
            got = len(choices) if isinstance(choices, list) else "no"
            raise ServerRejected(
                f"the server returned {got} choices for {len(payload['prompt'])} prompts x n={n}"
            )
        return reply

    def _groups(self, prompts: list[str], n: int, reply: dict[str, Any], first: int) -> list[list[Sample]]:
        """OpenAI orders choices prompt-major (index = prompt * n + sample); `index` says so explicitly."""
        choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
        version = reply.get("policy_version")
        version = version if isinstance(version, int) else self.version
        groups = []
        for p, prompt in enumerate(prompts):
            prompt_ids = self._ids(prompt)
            group = []
            for choice in choices[p * n : (p + 1) * n]:
                text = choice.get("text") or ""
                reason = "length" if choice.get("finish_reason") == "length" else "stop"
                response_ids = self._ids(text)
                if reason == "stop" and self.eos_id is not None:
                    response_ids.append(self.eos_id)  # the in-process engine keeps the EOS it sampled
                group.append(Sample(prompt, prompt_ids, response_ids, text, reason, version, group=first + p))
            groups.append(group)
        return groups

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
