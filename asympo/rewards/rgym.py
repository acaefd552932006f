"""`reward=reasoning_gym`: a reasoning-gym dataset's own scorer (the `reasoning-gym` extra).

The answer is the last `<answer>...</answer>` in the response, else its last non-empty line; the reference is
the whole entry, with the dataset's name and options (asympo.data.rgym puts them in the row's answer as
JSON), as the dataset's `score_answer` expects.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extracted(text: str) -> str:
    tagged = ANSWER.findall(text)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@functools.lru_cache(maxsize=16)
def scorer(dataset: str, options: str) -> Callable[[str, dict], float]:
    """The dataset's `score_answer`, built with the task's options (some scorers read them), once."""
    import reasoning_gym  # the `reasoning-gym` extra

    return reasoning_gym.create_dataset(dataset, size=1, seed=0, **json.loads(options)).score_answer


def reasoning_gym_reward(text: str, answer: str) -> float:
    row = json.loads(answer)
    score = scorer(row["dataset"], json.dumps(row["options"], sort_keys=True))
    return float(score(extracted(text), row["entry"]))
