"""Math answer rewards with math-verify: the final `\\boxed{}` answer against the reference.

Boxed-only by default: a last-number fallback would credit a response that merely mentions the answer
on the way to a wrong one, overstating correctness. Run under asympo's RewardGuard, which adds a hard
per-call timeout in a helper process, so even a parse that never returns cannot stall training.
"""

from __future__ import annotations

import threading

from asympo.data.answers import last_boxed, last_number
from asympo.errors import UserError

try:
    from math_verify import parse, verify
except ImportError:
    raise UserError("the math rewards need math-verify: pip install 'asympo[real]'") from None


def equivalent(candidate: str, reference: str) -> bool:
    """math-verify's equivalence of two final answers (numbers, fractions, LaTeX expressions, sets...)."""
    timeout = 5 if threading.current_thread() is threading.main_thread() else None  # signal-based
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    pred = parse(f"$\\boxed{{{candidate}}}$", parsing_timeout=timeout)
    if not gold or not pred:
        return candidate.strip() == reference.strip()
    return bool(verify(gold, pred, timeout_seconds=timeout))


def boxed_reward(response: str, answer: str) -> float:
    """1.0 iff the last boxed answer is mathematically equal to the reference; no box scores 0."""
    boxed = last_boxed(response)
    return 1.0 if boxed is not None and equivalent(boxed, answer) else 0.0


def lenient_reward(response: str, answer: str) -> float:
    """Like `boxed_reward`, but without a box the last number in the response is taken as the answer."""
    candidate = last_boxed(response)
    if candidate is None:
        candidate = last_number(response)
    return 1.0 if candidate is not None and equivalent(candidate, answer) else 0.0


def boxed_format_reward(response: str, answer: str) -> float:
    """`boxed_reward` plus 0.1 for a boxed answer at all: a small push towards the answer format."""
    boxed = last_boxed(response)
    if boxed is None:
        return 0.0
    return (1.0 if equivalent(boxed, answer) else 0.0) + 0.1
