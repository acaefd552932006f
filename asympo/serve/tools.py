"""Tool calls in chat: the tools go to the chat template, and calls in the reply come back as `tool_calls`.

The reply format is the one Qwen, Hermes and many chat templates define: each call is a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>` (vLLM's `hermes` parser reads
the same). A template that never mentions `<tool_call>` defines no way to call a tool, so a request with
tools to such a model is refused rather than answered as if the tools were not there.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def template_calls_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` and defines the `<tool_call>` reply format."""
    return bool(template) and "tools" in template and OPEN in template


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The reply's text before its first call (None when empty) and its calls in OpenAI's shape. A reply
    whose calls are not all valid JSON objects with a name is returned as plain text, with no calls."""
    if OPEN not in text:
        return text, []
    calls = []
    for body in CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    content = text[: text.index(OPEN)].strip()
    return content or None, calls
