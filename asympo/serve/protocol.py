"""Request fields of `/v1/completions` and `/v1/chat/completions`, checked the way OpenAI documents them.

Every field a client sends that changes what it gets back is honoured (stop strings, log-probs, echo,
streaming, token-id prompts, tools, vLLM's `return_token_ids`) or refused with a 400 that says so, never
silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asympo.config import SamplingConfig
from asympo.serve.errors import ApiError
from asympo.serve.logprobs import MAX_TOP

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat uses CHAT_MAX_TOKENS
CHAT_MAX_TOKENS = 256
MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_STOP_CHARS = 256  # per stop string: each is looked for in the last decoded tokens after every step
MAX_TOOLS = 128


@dataclass
class GenerationRequest:
    prompts: list[str] | None  # already formatted text (for chat, the rendered conversation); or
    prompt_ids: list[list[int]] | None  # prompts given as token ids (completions only)
    n: int
    sampling: SamplingConfig
    seed: int | None
    max_tokens_given: bool = True  # False: the default, which may shrink to fit the model's context
    model: str = ""  # the name the client asked for, echoed in the reply
    stops: tuple[str, ...] = ()
    top: int | None = None  # log-probs with this many alternatives; None: no log-probs
    echo: bool = False  # completions: the prompt (and its log-probs) come first in each choice
    generate: bool = True  # False: `max_tokens=0` with `echo`, the prompt is scored and nothing generated
    stream: bool = False
    include_usage: bool = False  # streaming: a last chunk with the token counts
    tools: list[dict[str, Any]] | None = None  # chat: function tools, given to the chat template
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat: as given to the template
    # vLLM's extension: the prompt's token ids and every token id drawn, as the engine saw and drew them
    return_token_ids: bool = False

    @property
    def count(self) -> int:
        return len(self.prompt_ids if self.prompt_ids is not None else self.prompts or [])


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{name}' must be a number", "invalid_type")
    if not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number", "invalid_value")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value}", "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", "invalid_type")
    if value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {value}", "invalid_value")
    if high is not None and value > high:
        raise ApiError(400, f"'{name}' must be at most {high}, got {value}", "invalid_value")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", "invalid_type")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", "invalid_type")
    stops = [s for s in stops if s]  # an empty stop string stops nothing: OpenAI ignores it too
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(
            400, f"each 'stop' string must be at most {MAX_STOP_CHARS} characters", "invalid_value"
        )
    check_text(stops, "'stop'", "invalid_value")
    return tuple(dict.fromkeys(stops))


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "invalid_value")
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_type")
    return stream, _flag(options, "include_usage")


def check_model(body: dict, served: tuple[str, ...]) -> str:
    """The name the client asked for (any of the served aliases), or the first alias when it named none."""
    model = body.get("model")
    if model is None:
        return served[0]
    if model not in served:
        names = ", ".join(f"'{s}'" for s in served)
        raise ApiError(
            404,
            f"the model '{str(model)[:200]}' does not exist; this server serves {names}",
            "model_not_found",
        )
    return model


def _sampling(body: dict, max_tokens: int) -> tuple[int, SamplingConfig, int | None]:
    n = _integer(body, "n", 1, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max(1, max_tokens))
    return n, sampling, _integer(body, "seed", None, -(2**63))


def _prompts(prompt: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """A string, a list of strings, a list of token ids, or a list of such lists (as vLLM takes them)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if any(not p for p in prompt):
            raise ApiError(400, "'prompt' must not be empty", "invalid_prompt")
        check_text(prompt, "'prompt'", "invalid_prompt")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        return None, [prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt)
    ):
        return None, prompt
    raise ApiError(
        400,
        "'prompt' must be a string, a non-empty list of strings, a list of token ids or a list of such lists",
        "invalid_prompt",
    )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_completion(body: dict, served: tuple[str, ...]) -> GenerationRequest:
    model = check_model(body, served)
    prompts, prompt_ids = _prompts(body.get("prompt"))
    echo = _flag(body, "echo")
    max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "'max_tokens' must be at least 1 (0 only with 'echo': true)", "invalid_value")
    logprobs = body.get("logprobs")
    if logprobs is False:  # some clients send a chat-style flag
        logprobs = None
    top = _integer(body, "logprobs", None, 0, MAX_TOP) if logprobs is not None else None
    n, sampling, seed = _sampling(body, max_tokens)
    stream, include_usage = _stream(body)
    if stream and echo:
        raise ApiError(400, "'echo' cannot be combined with 'stream'", "unsupported")
    return GenerationRequest(
        prompts,
        prompt_ids,
        n,
        sampling,
        seed,
        body.get("max_tokens") is not None,
        model=model,
        stops=_stops(body),
        top=top,
        echo=echo,
        generate=max_tokens > 0,
        stream=stream,
        include_usage=include_usage,
        return_token_ids=_flag(body, "return_token_ids"),
    )


def parse_chat(
    body: dict, served: tuple[str, ...], render: Callable[[GenerationRequest], str]
) -> GenerationRequest:
    model = check_model(body, served)
    if body.get("echo"):
        raise ApiError(400, "'echo' is not part of chat completions: use /v1/completions", "unsupported")
    messages = [_message(m) for m in _list(body, "messages", "invalid_messages")]
    check_text(
        [t for m in messages for t in (m["role"], m.get("content") or "")], "a message", "invalid_messages"
    )
    field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, field_name, CHAT_MAX_TOKENS, 1)
    n, sampling, seed = _sampling(body, max_tokens)
    top = None
    if _flag(body, "logprobs"):
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_value")
    stream, include_usage = _stream(body)
    request = GenerationRequest(
        None,
        None,
        n,
        sampling,
        seed,
        body.get(field_name) is not None,
        model=model,
        stops=_stops(body),
        top=top,
        stream=stream,
        include_usage=include_usage,
        tools=_tools(body),
        messages=messages,
        return_token_ids=_flag(body, "return_token_ids"),
    )
    prompt = render(request)
    if not prompt:
        raise ApiError(400, "the messages render to an empty prompt", "invalid_messages")
    request.prompts = [prompt]
    return request


def _list(body: dict, name: str, code: str) -> list:
    value = body.get(name)
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'{name}' must be a non-empty list", code)
    return value


def _message(m: Any) -> dict[str, Any]:
    """One chat message as the template takes it. Content may be a string, a list of text parts (joined), or
    null for an assistant turn that only calls tools; a tool call's JSON `arguments` become an object, as
    chat templates expect."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, "each message must be an object with a string 'role'", "invalid_messages")
    out: dict[str, Any] = {"role": m["role"]}
    content = m.get("content")
    if isinstance(content, list):
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise ApiError(
                400,
                "message content parts must be text parts ({'type': 'text', 'text': ...})",
                "invalid_messages",
            )
        content = "".join(p["text"] for p in content)
    calls = m.get("tool_calls")
    if content is None and not calls:
        raise ApiError(400, "each message needs a string 'content' (or 'tool_calls')", "invalid_messages")
    if content is not None and not isinstance(content, str):
        raise ApiError(400, "each message must have a string 'role' and 'content'", "invalid_messages")
    out["content"] = content if content is not None else ""
    if calls is not None:
        out["tool_calls"] = [_call(c) for c in calls] if isinstance(calls, list) else _bad_calls()
    for key in ("name", "tool_call_id"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _bad_calls() -> list:
    raise ApiError(400, "'tool_calls' must be a list", "invalid_messages")


def _call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, "each tool call needs a 'function' with a string 'name'", "invalid_messages")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise ApiError(400, "a tool call's 'arguments' is not valid JSON", "invalid_messages") from None
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tools(body: dict) -> list[dict[str, Any]] | None:
    """Function tools, or None when there are none or `tool_choice` is "none"."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "invalid_value")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(400, f"'tools' must be a list of at most {MAX_TOOLS} tools", "invalid_value")
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise ApiError(
                400, "each tool must be {'type': 'function', 'function': {'name': ..., ...}}", "invalid_value"
            )
    if choice == "none":
        return None
    if choice not in (None, "auto"):
        raise ApiError(
            400, "'tool_choice' may be 'auto' or 'none': forcing a call is not supported", "unsupported"
        )
    return tools


def check_text(texts: list[str], what: str, code: str) -> None:
    """Text a tokenizer can take: JSON may carry a lone surrogate (`"\\ud800"`), which is no Unicode text."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{what} is not valid Unicode (a lone surrogate?)", code) from None


def parse_version(value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, "'version' must be an integer >= 0", "invalid_version")
    return value
