"""Where a turn ends besides EOS and `max_new_tokens`: at a stop string, or at a per-sequence token budget.

asympo's engine checks after every decode step (a `StepWatch`); engines behind an API pass the same settings
to their server.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stop_end(tokenizer, ids: list[int], stops: Sequence[str]) -> int | None:
    """How many of `ids` to keep: up to the token that completes the first stop string; None if none does.
    The same test as `StopWatch`, for an engine that cannot stop at strings itself."""
    watch = StopWatch(tokenizer, stops, [len(ids) + 1])
    for end, token in enumerate(ids, 1):
        if watch([0], torch.tensor([token]), torch.empty(0)):
            return end
    return None


class StopWatch:
    """Ends a sequence when its text holds one of `stops`, or when it has drawn its `budgets` entry."""

    def __init__(self, tokenizer, stops: Sequence[str], budgets: list[int]):
        self.tokenizer, self.stops, self.budgets = tokenizer, list(stops), budgets
        self.counts = [0] * len(budgets)
        self.tails: list[list[int]] = [[] for _ in budgets]
        self.window = 4 * max((len(s) for s in stops), default=0) + 2  # tokens enough to spell any stop
        self.cut: set[int] = set()  # ended by the budget: their finish reason is `length`

    def __call__(self, seqs: list[int], tokens: torch.Tensor, logits: torch.Tensor) -> list[int]:
        ended = []
        for seq, token in zip(seqs, tokens.tolist(), strict=True):
            self.counts[seq] += 1
            if self.stops:
                tail = self.tails[seq]
                tail.append(token)
                del tail[: -self.window]
                if any(stop in self.tokenizer.decode(tail, skip_special_tokens=False) for stop in self.stops):
                    ended.append(seq)
                    continue
            if self.counts[seq] >= self.budgets[seq]:
                self.cut.add(seq)
                ended.append(seq)
        return ended
