"""The endpoints, free of HTTP plumbing: each takes the parsed request and returns (status, JSON body)."""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.rollout.hf import HFEngine
from asympo.serve import weights
from asympo.serve.batcher import Batcher, Job
from asympo.serve.errors import ApiError
from asympo.serve.protocol import GenerationRequest, parse_chat, parse_completion, parse_version

Reply = tuple[int, dict[str, Any]]
MAX_SEQUENCES = 4096  # prompts x n in one request: a typo in `n` should be a 400, not an out-of-memory


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # case-insensitive in practice (http.server's message object)
    body: bytes


class App:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        served: str,
        api_key: str | None = None,
        max_batch: int = 256,
        seed: int = 0,
        version: int = 0,
    ):
        self.model, self.tokenizer, self.served = model, tokenizer, served
        self._api_key = api_key  # compared in constant time, never logged or echoed
        self.created = int(time.time())
        self.context = getattr(model.config, "max_position_embeddings", None)
        engine = HFEngine(model, tokenizer, version=version, return_logprobs=False, max_batch=max_batch)
        self.batcher = Batcher(engine, seed)
        self.tokenizer_lock = threading.Lock()  # a Rust tokenizer may refuse two threads at once

    def __repr__(self) -> str:
        return f"App(served={self.served!r}, version={self.batcher.version})"

    @property
    def version(self) -> int:
        return self.batcher.version

    def authorized(self, header: str | None) -> bool:
        if self._api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._api_key.encode()
        )

    def handle(self, req: Request) -> Reply:
        path = req.path.rstrip("/") or "/"
        if path == "/health":  # open without a key, for load balancers: it tells only the version
            self._allow(req, path, "GET")
            return 200, {"status": "ok", "version": self.version}
        if path.startswith("/v1/models/"):
            want, endpoint = "GET", App.model_info
        elif path in ROUTES:
            want, endpoint = ROUTES[path]
        else:
            raise ApiError(404, f"unknown path {path}", "not_found")
        if not self.authorized(req.headers.get("Authorization")):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key"
            )
        self._allow(req, path, want)
        return endpoint(self, req)

    @staticmethod
    def _allow(req: Request, path: str, want: str) -> None:
        if req.method != want:
            raise ApiError(405, f"{path} takes {want}, not {req.method}", "method_not_allowed")

    def models(self, req: Request) -> Reply:
        return 200, {"object": "list", "data": [self._card()]}

    def model_info(self, req: Request) -> Reply:
        name = unquote(req.path.rstrip("/").removeprefix("/v1/models/"))
        if name != self.served:
            raise ApiError(404, f"the model '{name}' does not exist", "model_not_found")
        return 200, self._card()

    def _card(self) -> dict[str, Any]:
        return {"id": self.served, "object": "model", "created": self.created, "owned_by": "asympo"}

    def completions(self, req: Request) -> Reply:
        request = parse_completion(json_object(req.body), self.served)
        job, usage = self._run(request)
        choices = [
            {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(self._texts(job))
        ]
        return 200, self._envelope("cmpl", "text_completion", choices, usage, job.version)

    def chat_completions(self, req: Request) -> Reply:
        request = parse_chat(json_object(req.body), self.served, self.render_chat)
        job, usage = self._run(request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            for i, (text, reason) in enumerate(self._texts(job))
        ]
        return 200, self._envelope("chatcmpl", "chat.completion", choices, usage, job.version)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's chat template when it has one, else the contents joined as plain paragraphs."""
        if getattr(self.tokenizer, "chat_template", None):
            with self.tokenizer_lock:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
        return "\n\n".join(m["content"] for m in messages)

    def reload(self, req: Request) -> Reply:
        """Raw safetensors bytes (`?version=N`) from another machine, or JSON naming a file on this one."""
        if req.headers.get("Content-Type", "").split(";")[0].strip() == "application/octet-stream":
            version = parse_version(req.query.get("version"))
            state = weights.read_bytes(req.body)
        else:
            request = json_object(req.body)
            version = parse_version(request.get("version"))
            state = weights.read_path(request.get("path"))
        weights.check_fits(self.model, state)
        self.batcher.swap_weights(state, version)
        return 200, {"version": version}

    def _run(self, request: GenerationRequest) -> tuple[Job, dict[str, int]]:
        if len(request.prompts) * request.n > MAX_SEQUENCES:
            raise ApiError(400, f"prompts x n must be at most {MAX_SEQUENCES} per request", "invalid_value")
        with self.tokenizer_lock:
            ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in request.prompts]
        if any(not x for x in ids):
            raise ApiError(400, "a prompt tokenizes to nothing", "invalid_prompt")
        sampling = request.sampling
        if self.context is not None:
            room = self.context - max(len(x) for x in ids)
            if not request.max_tokens_given and room >= 1:
                sampling = sampling.model_copy(update={"max_new_tokens": min(sampling.max_new_tokens, room)})
            elif room < sampling.max_new_tokens:
                raise ApiError(
                    400,
                    f"prompt ({self.context - room} tokens) + max_tokens ({sampling.max_new_tokens}) exceeds "
                    f"the model's context of {self.context} tokens",
                    "context_length_exceeded",
                )
        job = self.batcher.submit(Job(ids, request.n, sampling, request.seed))
        if job.error is not None:
            raise ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", "engine_error")
        completion = sum(len(r) for r in job.responses)
        prompt = sum(len(x) for x in ids)
        return job, {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _texts(self, job: Job) -> list[tuple[str, str]]:
        with self.tokenizer_lock:
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in job.responses]
        return list(zip(texts, job.reasons, strict=True))

    def _envelope(self, prefix: str, kind: str, choices: list, usage: dict, version: int) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.served,
            "choices": choices,
            "usage": usage,
            "policy_version": version,  # the weights that generated these choices
        }


def json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return data


ROUTES = {
    "/v1/models": ("GET", App.models),
    "/v1/completions": ("POST", App.completions),
    "/v1/chat/completions": ("POST", App.chat_completions),
    "/v1/weights": ("POST", App.reload),
}
