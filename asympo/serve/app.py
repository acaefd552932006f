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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.errors import UserError
from asympo.rollout.hf import HFEngine
from asympo.serve import weights
from asympo.serve.batcher import Batcher, Job
from asympo.serve.errors import ApiError
from asympo.serve.logprobs import TokenScores, chat_logprobs, completion_logprobs, token_texts
from asympo.serve.protocol import GenerationRequest, parse_chat, parse_completion, parse_version
from asympo.serve.streaming import DONE, Stream, TextStream, cut_at_stop, event
from asympo.serve.tools import OPEN, parse_tool_calls, template_calls_tools

Reply = tuple[int, dict[str, Any] | Stream]
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
        served: str | tuple[str, ...],
        api_key: str | None = None,
        max_batch: int = 256,
        seed: int = 0,
        version: int = 0,
        weights_dir: Path | None = None,
        chat_template: str | None = None,
        engine: HFEngine | None = None,
    ):
        """`engine`: serve through this engine (e.g. a training run's live rollout engine, in-process on
        loopback) instead of one of the app's own: its weights, and its `version` (the `version` and
        `max_batch` arguments are then unused). `model` and `tokenizer` must be the engine's own. The app
        decodes under `self.batcher.lock`: other users of the engine hold it too (or load weights through
        `self.batcher.swap_weights`), so weights change only between batches and no two decodes overlap."""
        if engine is not None and (engine.model is not model or engine.tokenizer is not tokenizer):
            raise ValueError("App(engine=...) needs model=engine.model and tokenizer=engine.tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.served = (served,) if isinstance(served, str) else tuple(served)  # the first is the main name
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or None
        self.calls_tools = template_calls_tools(self.chat_template)
        self.vocab = len(tokenizer)
        self._api_key = api_key  # compared in constant time, never logged or echoed
        self.weights_dir = weights_dir
        self.created = int(time.time())
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.tokenizers = TokenizerPool(tokenizer)
        self.prompt_chars = prompt_char_limit(self.context, tokenizer)
        # JSON may spell one character as a 12-byte surrogate pair escape; a list of prompts shares the cap.
        self.body_limit = max(MIN_BODY, 12 * self.prompt_chars) + JSON_SLACK
        self.weights_limit = weights.upload_limit(model)
        if engine is None:
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
        return 200, {"object": "list", "data": [self._card(name) for name in self.served]}

    def model_info(self, req: Request) -> Reply:
        name = unquote(req.path.rstrip("/").removeprefix("/v1/models/"))
        if name not in self.served:
            raise ApiError(404, f"the model '{name[:200]}' does not exist", "model_not_found")
        return 200, self._card(name)

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "asympo"}

    def completions(self, req: Request) -> Reply:
        request = parse_completion(json_object(req.body), self.served)
        job, usage = self._start(request)
        if request.stream:
            return 200, self._stream(job, request, usage, chat=False)
        self._wait(job)
        with self.tokenizers.borrow() as tokenizer:
            choices = [
                self._completion_choice(tokenizer, job, request, i)
                for i in range(len(job.prompt_ids) * job.n)
            ]
        usage = self._usage(usage["prompt_tokens"], job)
        return 200, self._envelope("cmpl", "text_completion", request.model, choices, usage, job.version)

    def _completion_choice(
        self, tokenizer: PreTrainedTokenizerBase, job: Job, request: GenerationRequest, i: int
    ) -> dict[str, Any]:
        prompt = i // request.n
        text, reason, kept, matched = "", "length", 0, None
        if job.generate:
            full = tokenizer.decode(job.responses[i], skip_special_tokens=True)
            text, hit = cut_at_stop(full, request.stops)
            reason = "stop" if hit else job.reasons[i]
            matched = next((s for s in request.stops if full.startswith(s, len(text))), None) if hit else None
            kept = (
                _tokens_before(token_texts(tokenizer, job.responses[i]), len(text))
                if hit
                else len(job.responses[i])
            )
        head = ""
        if request.echo:
            given = request.prompts
            head = given[prompt] if given is not None else tokenizer.decode(job.prompt_ids[prompt])
        logprobs = None
        if request.top is not None:
            scores = TokenScores()
            if request.echo:
                scores.extend(job.prompt_scores[prompt])
            if job.generate:
                scores.extend(job.scores[i].head(kept))
            logprobs = completion_logprobs(tokenizer, scores, request.top)
        # `stop_reason`: the stop string that ended it (vLLM's extension; null for EOS and length)
        choice = {"index": i, "text": head + text, "finish_reason": reason, "logprobs": logprobs}
        choice["stop_reason"] = matched
        if request.return_token_ids:  # every id drawn: EOS and the tokens of a cut stop string included
            choice["prompt_token_ids"] = list(job.prompt_ids[prompt])
            choice["token_ids"] = list(job.responses[i]) if job.generate else []
        return choice

    def chat_completions(self, req: Request) -> Reply:
        request = parse_chat(json_object(req.body), self.served, self.render_chat)
        job, usage = self._start(request)
        if request.stream:
            return 200, self._stream(job, request, usage, chat=True)
        self._wait(job)
        choices = []
        with self.tokenizers.borrow() as tokenizer:
            for i, response in enumerate(job.responses):
                text, hit = cut_at_stop(tokenizer.decode(response, skip_special_tokens=True), request.stops)
                message, reason = self._message(text, "stop" if hit else job.reasons[i], request)
                logprobs = None
                if request.top is not None:
                    kept = (
                        _tokens_before(token_texts(tokenizer, response), len(text)) if hit else len(response)
                    )
                    logprobs = chat_logprobs(tokenizer, job.scores[i].head(kept), request.top)
                choice = {"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs}
                if request.return_token_ids:  # every id drawn: EOS and the tokens of a cut stop string too
                    choice["token_ids"] = list(response)
                choices.append(choice)
        usage = self._usage(usage["prompt_tokens"], job)
        reply = self._envelope("chatcmpl", "chat.completion", request.model, choices, usage, job.version)
        if request.return_token_ids:  # the rendered conversation's ids, as the engine saw them
            reply["prompt_token_ids"] = list(job.prompt_ids[0])
        return 200, reply

    @staticmethod
    def _message(text: str, reason: str, request: GenerationRequest) -> tuple[dict[str, Any], str]:
        """The assistant message of a chat choice: its tool calls, when tools were offered and it made any."""
        if request.tools:
            content, calls = parse_tool_calls(text)
            if calls:
                return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": text}, reason

    def render_chat(self, request: GenerationRequest) -> str:
        """The chat template (the tokenizer's, or the one the server was given) with the request's tools, or
        without a template the contents joined as plain paragraphs."""
        messages = request.messages
        if sum(len(m["content"]) for m in messages) > self.prompt_chars:
            raise self._too_long()
        if request.tools and not self.calls_tools:
            raise ApiError(
                400,
                "this model's chat template defines no tool-call format (<tool_call> JSON); "
                "start the server with chat_template=FILE to give it one",
                "tools_unsupported",
            )
        if self.chat_template is None:
            return "\n\n".join(m["content"] for m in messages)
        extra = {"tools": request.tools} if request.tools else {}
        with self.tokenizers.borrow() as tokenizer:
            try:
                return tokenizer.apply_chat_template(
                    messages,
                    chat_template=self.chat_template,
                    tokenize=False,
                    add_generation_prompt=True,
                    **extra,
                )
            except Exception as e:  # a template may raise on what it does not accept (roles out of order)
                message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise ApiError(
                    400, f"the chat template refused these messages: {message}", "invalid_messages"
                ) from None

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

    def _start(self, request: GenerationRequest) -> tuple[Job, dict[str, int]]:
        """Tokenize, check the request fits the context, and queue it; the prompt's token count."""
        count = request.count
        if count * request.n > MAX_SEQUENCES:
            raise ApiError(400, f"prompts x n must be at most {MAX_SEQUENCES} per request", "invalid_value")
        if request.prompt_ids is not None:
            ids = request.prompt_ids
            if any(t < 0 or t >= self.vocab for p in ids for t in p):
                raise ApiError(400, f"token ids must be in [0, {self.vocab})", "invalid_prompt")
        else:
            prompts = request.prompts or []
            if any(len(p) > self.prompt_chars for p in prompts):
                raise self._too_long()  # before tokenizing: a huge prompt costs seconds to tokenize
            with self.tokenizers.borrow() as tokenizer:
                ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if any(not x for x in ids):
            raise ApiError(400, "a prompt tokenizes to nothing", "invalid_prompt")
        sampling = request.sampling
        if self.context is not None:
            longest = max(len(x) for x in ids)
            room = self.context - longest
            wanted = sampling.max_new_tokens if request.generate else 0
            if request.generate and not request.max_tokens_given and room >= 1:
                sampling = sampling.model_copy(update={"max_new_tokens": min(sampling.max_new_tokens, room)})
            elif room < wanted or room < 0:
                raise ApiError(
                    400,
                    f"prompt ({longest} tokens) + max_tokens ({wanted}) exceeds the model's context of "
                    f"{self.context} tokens",
                    "context_length_exceeded",
                )
        job = Job(
            ids,
            request.n,
            sampling,
            request.seed,
            stops=request.stops,
            top=request.top,
            echo=request.echo,
            generate=request.generate,
            stream=queue.SimpleQueue() if request.stream else None,
        )
        self.batcher.enqueue(job)
        return job, {"prompt_tokens": sum(len(x) for x in ids)}

    @staticmethod
    def _wait(job: Job) -> None:
        job.done.wait()
        if isinstance(job.error, ApiError):
            raise job.error
        if job.error is not None:
            raise ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", "engine_error")

    @staticmethod
    def _usage(prompt: int, job: Job) -> dict[str, int]:
        completion = sum(len(r) for r in job.responses)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _stream(self, job: Job, request: GenerationRequest, usage: dict[str, int], chat: bool) -> Stream:
        def cancel() -> None:
            job.cancelled = True

        def final_usage() -> dict[str, int]:
            job.done.wait()
            return self._usage(usage["prompt_tokens"], job)

        return Stream(self._chunks(job, request, chat), cancel, final_usage)

    def _chunks(self, job: Job, request: GenerationRequest, chat: bool) -> Iterator[bytes]:
        """The SSE events of a streaming reply, as the engine produces tokens: text deltas per choice, each
        choice's finish reason, the usage when asked for, then `[DONE]`."""
        prefix, kind = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
        head = self._envelope(prefix, kind, request.model, [], None, job.version)
        del head["usage"]
        withhold = (OPEN,) if chat and request.tools else ()
        choices = [ChoiceStream(TextStream(request.stops, withhold)) for _ in range(job.sequences)]
        if chat:
            hello = [_delta(i, {"role": "assistant", "content": ""}) for i in range(job.sequences)]
            first = head | {"choices": hello}
            if request.return_token_ids:  # the prompt's ids once, in the first chunk; no token drawn yet
                first["prompt_token_ids"] = list(job.prompt_ids[0])
                for part in hello:
                    part["token_ids"] = []
            yield event(first)
        over = False
        while not over and not all(c.reason for c in choices):
            items = [job.stream.get()]
            while items[-1] is not None and not job.stream.empty():
                items.append(job.stream.get())
            over = items[-1] is None
            for i, token, _, reason in filter(None, items):
                choices[i].tokens.append(token)
                choices[i].reason = choices[i].reason or reason
            with self.tokenizers.borrow() as tokenizer:
                parts = [self._chunk_part(tokenizer, job, request, chat, i, c) for i, c in enumerate(choices)]
            if parts := [p for p in parts if p is not None]:
                yield event(head | {"choices": parts})
        job.done.wait()
        if job.error is not None:
            error = job.error
            if not isinstance(error, ApiError):
                error = ApiError(500, f"generation failed: {type(error).__name__}", "engine_error")
            yield event(error.body())
            yield DONE
            return
        if request.include_usage:
            usage = self._usage(sum(len(x) for x in job.prompt_ids), job)
            yield event(head | {"choices": [], "usage": usage})
        yield DONE

    def _chunk_part(
        self,
        tokenizer: PreTrainedTokenizerBase,
        job: Job,
        request: GenerationRequest,
        chat: bool,
        i: int,
        choice: ChoiceStream,
    ) -> dict[str, Any] | None:
        """One choice's part of a chunk: the text that became safe to send, its tokens' log-probs, and at
        its end the finish reason (and for chat, any tool calls, sent whole). None: nothing new.
        With `return_token_ids`, every part carries the ids drawn since the last one (`token_ids`, sent even
        while their text is held back), and a completion choice's first part its prompt's ids."""
        if not choice.tokens or choice.sent_end:
            return None
        new, choice.tokens = choice.tokens, []
        reason, extra = None, {}
        if choice.reason is None:
            piece = choice.text.advance(tokenizer, new)
        else:
            choice.text.ids += new
            final, piece, hit = choice.text.finish(tokenizer)
            reason, choice.sent_end = ("stop" if hit else choice.reason), True
            if chat:
                message, reason = self._message(final, reason, request)
                if message.get("tool_calls"):
                    extra["tool_calls"] = [c | {"index": k} for k, c in enumerate(message["tool_calls"])]
                    piece = ""
        logprobs = None
        if request.top is not None:
            scores = job.scores[i]
            fresh = TokenScores(
                *(part[choice.scored :] for part in (scores.ids, scores.logprobs, scores.tops))
            )
            choice.scored += len(fresh.ids)
            shape = chat_logprobs if chat else completion_logprobs
            logprobs = shape(tokenizer, fresh, request.top)
        ids: dict[str, list[int]] = {}
        if request.return_token_ids:
            if not chat and not choice.sent_prompt:
                ids["prompt_token_ids"] = list(job.prompt_ids[i // job.n])
                choice.sent_prompt = True
            ids["token_ids"] = new
        elif not piece and reason is None and logprobs is None:
            return None
        if not chat:
            return {"index": i, "text": piece, "finish_reason": reason, "logprobs": logprobs} | ids
        return _delta(i, ({"content": piece} if piece or not extra else {}) | extra, reason, logprobs) | ids

    def _envelope(
        self, prefix: str, kind: str, model: str, choices: list, usage: dict | None, version: int
    ) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
            "policy_version": version,  # the weights that generated these choices
        }


@dataclass
class ChoiceStream:
    """Where one choice of a streaming reply stands: its text, tokens not yet sent, the engine's finish
    reason once it has one, and how many of its log-prob entries have gone out."""

    text: TextStream
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    sent_end: bool = False
    scored: int = 0
    sent_prompt: bool = False  # `return_token_ids`: a completion choice's prompt ids have gone out


def _delta(
    i: int, delta: dict[str, Any], reason: str | None = None, logprobs: dict | None = None
) -> dict[str, Any]:
    return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}


def _tokens_before(texts: list[str], end: int) -> int:
    """How many tokens start before character `end` of their joined text: those a cut text keeps."""
    at = 0
    for count, text in enumerate(texts):
        if at >= end:
            return count
        at += len(text)
    return len(texts)


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
