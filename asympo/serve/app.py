"""The endpoints, free of HTTP plumbing: each takes the parsed request and returns (status, JSON body).

`route` runs first, on the headers alone: path, API key and method are checked, and the body limit of the
route is chosen, before any byte of the body is read (see server.py). The endpoints then run in a worker
thread: they tokenize (on a tokenizer of their own, see `TokenizerPool`) and wait for the engine thread.
"""

from __future__ import annotations

import copy
import hmac
import json
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.errors import UserError
from asympo.rollout.hf import HFEngine
from asympo.serve import weights
from asympo.serve.batcher import Batcher, Job
from asympo.serve.errors import ApiError
from asympo.serve.protocol import GenerationRequest, parse_chat, parse_completion, parse_version

Reply = tuple[int, dict[str, Any]]
MAX_SEQUENCES = 4096  # prompts x n in one request: a typo in `n` should be a 400, not an out-of-memory
MAX_PROMPT_CHARS = 1_000_000  # the ceiling of the per-prompt character limit, whatever the context length
MIN_BODY = 2**20  # a completions body may always be this large (a list of short prompts)
JSON_SLACK = 64 * 2**10  # room for the other fields of a request
SMALL_BODY = 64 * 2**10  # JSON bodies that carry no prompt: the `path` form of /v1/weights
TOKENIZERS = 4  # requests tokenizing at the same moment, each on its own copy


class TokenizerPool:
    """A few copies of the tokenizer, lent one per request: a Rust tokenizer may refuse two threads at once,
    and one lock for all would let one long prompt hold up everyone. The engine thread never uses these."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, size: int = TOKENIZERS):
        self.free: queue.SimpleQueue[PreTrainedTokenizerBase] = queue.SimpleQueue()
        try:
            copies = [tokenizer] + [copy.deepcopy(tokenizer) for _ in range(size - 1)]
        except Exception:  # a tokenizer that cannot be copied is shared, one request at a time
            copies = [tokenizer]
        for t in copies:
            self.free.put(t)

    @contextmanager
    def borrow(self) -> Iterator[PreTrainedTokenizerBase]:
        tokenizer = self.free.get()
        try:
            yield tokenizer
        finally:
            self.free.put(tokenizer)


def api_key_from(name: str) -> str | None:
    """The key in `$name`: unset means no key; set but empty (or only spaces) is a mistake, refused at
    start-up rather than silently turning auth off. Surrounding spaces (a key pasted from a file) are
    stripped."""
    value = os.environ.get(name)
    if value is None:
        return None
    key = value.strip()
    if not key:
        raise UserError(f"${name} is set but empty: unset it to serve without a key, or give it a key")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise UserError(f"${name} holds spaces or control characters inside the key: it could never be sent")
    return key


def prompt_char_limit(context: int | None, tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters beyond which a prompt cannot fit the context, whatever it says: no token is longer than the
    longest string in the vocabulary, so `context` tokens cover at most `context x longest` characters."""
    if context is None:
        return MAX_PROMPT_CHARS
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    except Exception:
        longest = 64
    return max(1, min(MAX_PROMPT_CHARS, context * max(1, longest)))


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # case-insensitive (Starlette's Headers)
    body: bytes = b""


Endpoint = Callable[["App", Request], Reply]


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
        weights_dir: Path | None = None,
    ):
        self.model, self.tokenizer, self.served = model, tokenizer, served
        self._api_key = api_key  # compared in constant time, never logged or echoed
        self.weights_dir = weights_dir
        self.created = int(time.time())
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.tokenizers = TokenizerPool(tokenizer)
        self.prompt_chars = prompt_char_limit(self.context, tokenizer)
        # JSON may spell one character as a 12-byte surrogate pair escape; a list of prompts shares the cap.
        self.body_limit = max(MIN_BODY, 12 * self.prompt_chars) + JSON_SLACK
        self.weights_limit = weights.upload_limit(model)
        engine = HFEngine(model, tokenizer, version=version, return_logprobs=False, max_batch=max_batch)
        self.batcher = Batcher(engine, seed)

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

    def route(self, req: Request) -> tuple[Endpoint, int]:
        """The endpoint and the most body bytes it may read, from the request line and headers alone.
        The key is checked before the path is looked up: without it, even an unknown path is a 401."""
        path = req.path.rstrip("/") or "/"
        if path == "/health":  # open without a key, for load balancers: the version and the load
            self._allow(req, path, "GET")
            return App.health, 0
        if not self.authorized(req.headers.get("Authorization")):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key"
            )
        if path.startswith("/v1/models/"):
            want, endpoint = "GET", App.model_info
        elif path in ROUTES:
            want, endpoint = ROUTES[path]
        else:
            raise ApiError(404, "unknown path", "not_found")
        self._allow(req, path, want)
        if want == "GET":
            return endpoint, 0
        if endpoint is App.reload:
            return endpoint, self.weights_limit if _octet_stream(req) else SMALL_BODY
        return endpoint, self.body_limit

    @staticmethod
    def _allow(req: Request, path: str, want: str) -> None:
        if req.method != want:
            raise ApiError(405, f"this path takes {want}, not {req.method[:16]}", "method_not_allowed")

    def health(self, req: Request) -> Reply:
        return 200, {"status": "ok", "version": self.version, "requests": self.batcher.held}

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
        if sum(len(m["content"]) for m in messages) > self.prompt_chars:
            raise self._too_long()
        if getattr(self.tokenizer, "chat_template", None):
            with self.tokenizers.borrow() as tokenizer:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def _too_long(self) -> ApiError:
        room = f" of {self.context} tokens" if self.context is not None else ""
        message = f"a prompt over {self.prompt_chars} characters cannot fit the model's context{room}"
        return ApiError(400, message, "context_length_exceeded")

    def reload(self, req: Request) -> Reply:
        """Raw safetensors bytes (`?version=N`) from another machine, or JSON naming a file on this one."""
        if _octet_stream(req):
            version = parse_version(req.query.get("version"))
            state = weights.read_bytes(req.body)
            weights.check_fits(self.model, state)
        else:
            request = json_object(req.body)
            version = parse_version(request.get("version"))
            state = weights.read_path(request.get("path"), self.weights_dir)
            try:
                weights.check_fits(self.model, state)
            except ApiError as e:  # its message would quote the file's tensor names: say only that it failed
                raise ApiError(400, "the weights at that path do not fit this model", e.code) from None
        self.batcher.swap_weights(state, version)
        return 200, {"version": version}

    def _run(self, request: GenerationRequest) -> tuple[Job, dict[str, int]]:
        if len(request.prompts) * request.n > MAX_SEQUENCES:
            raise ApiError(400, f"prompts x n must be at most {MAX_SEQUENCES} per request", "invalid_value")
        if any(len(p) > self.prompt_chars for p in request.prompts):
            raise self._too_long()  # before tokenizing: a huge prompt costs seconds and memory to tokenize
        with self.tokenizers.borrow() as tokenizer:
            ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in request.prompts]
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
        if isinstance(job.error, ApiError):
            raise job.error
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
        with self.tokenizers.borrow() as tokenizer:
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in job.responses]
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


def _octet_stream(req: Request) -> bool:
    return req.headers.get("Content-Type", "").split(";")[0].strip().lower() == "application/octet-stream"


def _no_constant(name: str) -> None:
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number", "invalid_json")


def json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null", parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", "invalid_json") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:120]}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return data


ROUTES = {
    "/v1/models": ("GET", App.models),
    "/v1/completions": ("POST", App.completions),
    "/v1/chat/completions": ("POST", App.chat_completions),
    "/v1/weights": ("POST", App.reload),
}
