"""Streaming replies: text that grows token by token, sent as Server-Sent Events.

A stream may only send text the final reply will hold. Two things could make a sent piece wrong later: a
token that ends inside a multi-byte character (it decodes to U+FFFD until the next token completes it), and
the start of a stop string, which the final text cuts away. So each step sends the newly decoded text minus
any trailing U+FFFD and minus the last `len(longest stop) - 1` characters; those follow once they are safe.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first place any stop string starts, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class TextStream:
    """One choice's text as it grows: `advance` returns the piece that is safe to send now. Nothing from the
    first `withhold` string on is sent while streaming (a tool call, sent whole at the end instead)."""

    def __init__(self, stops: tuple[str, ...], withhold: tuple[str, ...] = ()):
        self.stops, self.withhold = stops, withhold
        self.hold = max((len(s) for s in stops + withhold), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already sent

    def advance(self, tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
        self.ids += tokens
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        safe = len(text.rstrip("\ufffd")) - self.hold
        for marker in self.withhold:
            if marker in text:
                safe = min(safe, text.index(marker))
        piece = text[self.sent : safe] if safe > self.sent else ""
        self.sent += len(piece)
        return piece

    def finish(self, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, bool]:
        """The final text (cut at a stop string), what of it is still unsent, and whether a stop was hit."""
        final, hit = cut_at_stop(tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        rest = final[self.sent :]
        self.sent = max(self.sent, len(final))
        return final, rest, hit


class Stream:
    """A streaming reply: `next()` blocks for the next SSE bytes (None at the end), in a worker thread;
    `cancel()` (the client went away) ends the job's sequences at the engine's next step; `usage()` waits
    for the job to end and counts its tokens, for the access log."""

    def __init__(self, chunks: Iterator[bytes], cancel: Callable[[], None], usage: Callable[[], dict]):
        self.chunks, self.cancel, self.usage = chunks, cancel, usage
        self.dropped = False  # the client went away before the end

    def next(self) -> bytes | None:
        return next(self.chunks, None)
