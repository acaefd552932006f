"""Request fields of `/v1/completions` and `/v1/chat/completions`, checked the way OpenAI documents them.

Anything this server cannot honour (streaming, stop sequences, log-probs) is refused with a 400 rather than
silently ignored, so a client never trains on something it did not ask for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asympo.config import SamplingConfig
from asympo.serve.errors import ApiError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat uses CHAT_MAX_TOKENS
CHAT_MAX_TOKENS = 256


@dataclass
class GenerationRequest:
    prompts: list[str]  # already formatted text: for chat, the rendered conversation
    n: int
    sampling: SamplingConfig
    seed: int | None
    max_tokens_given: bool = True  # False: the default, which may shrink to fit the model's context


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


def _integer(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", "invalid_type")
    if value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {value}", "invalid_value")
    return value


def _refuse_unsupported(body: dict) -> None:
    if body.get("stream"):
        raise ApiError(400, "streaming is not supported by asympo serve", "unsupported")
    if body.get("stop") not in (None, "", []):
        raise ApiError(400, "stop sequences are not supported by asympo serve", "unsupported")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
        raise ApiError(400, "logprobs and echo are not supported by asympo serve", "unsupported")


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(
            404, f"the model '{model}' does not exist; this server serves '{served}'", "model_not_found"
        )


def _sampling(body: dict, max_tokens: int) -> tuple[int, SamplingConfig, int | None]:
    n = _integer(body, "n", 1, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens)
    return n, sampling, _integer(body, "seed", None, -(2**63))


def parse_completion(body: dict, served: str) -> GenerationRequest:
    check_model(body, served)
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "invalid_prompt")
    if any(not p for p in prompts):
        raise ApiError(400, "'prompt' must not be empty", "invalid_prompt")
    check_text(prompts, "'prompt'", "invalid_prompt")
    max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    n, sampling, seed = _sampling(body, max_tokens)
    return GenerationRequest(prompts, n, sampling, seed, body.get("max_tokens") is not None)


def parse_chat(body: dict, served: str, render: Callable[[list[dict[str, Any]]], str]) -> GenerationRequest:
    check_model(body, served)
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ApiError(400, "each message must have a string 'role' and 'content'", "invalid_messages")
    check_text([t for m in messages for t in (m["role"], m["content"])], "a message", "invalid_messages")
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, field, CHAT_MAX_TOKENS, 1)
    n, sampling, seed = _sampling(body, max_tokens)
    prompt = render([{"role": m["role"], "content": m["content"]} for m in messages])
    if not prompt:
        raise ApiError(400, "the messages render to an empty prompt", "invalid_messages")
    return GenerationRequest([prompt], n, sampling, seed, body.get(field) is not None)


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
