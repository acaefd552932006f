"""`reward=reasoning_gym`: a reasoning-gym dataset's own scorer (the `reasoning-gym` extra).

The answer is the last `<answer>...</answer>` in the response, else its last non-empty line; the reference is
the whole entry (asympo.data.rgym puts it in the row's answer as JSON), as `score_answer` expects.
"""

from __future__ import annotations

import json
import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extracted(text: str) -> str:
    tagged = ANSWER.findall(text)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def reasoning_gym_reward(text: str, answer: str) -> float:
    from reasoning_gym import get_score_answer_fn  # the `reasoning-gym` extra

    entry = json.loads(answer)
    score = get_score_answer_fn(entry["metadata"]["source_dataset"])
    return float(score(extracted(text), entry))
