"""Built-in generated arithmetic task: seeded, with train and test splits that never share a problem.

A problem belongs to the test split iff a hash of its text falls in the test bucket, so the split is a
property of the problem itself: no train stream, however long, can ever produce a test problem.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from asympo.config import TaskConfig
from asympo.errors import UserError

BUCKETS = 10  # one problem in ten is held out for testing; with validation_size > 0 another one in ten
TEST_BUCKET, VALIDATION_BUCKET = 0, 1


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def bucket(prompt: str) -> int:
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % BUCKETS


def is_test(prompt: str) -> bool:
    return bucket(prompt) == TEST_BUCKET


def is_held_out(prompt: str, cfg: TaskConfig) -> bool:
    """Never trained on: the test bucket, and the validation bucket when the task has a validation set."""
    b = bucket(prompt)
    return b == TEST_BUCKET or (cfg.validation_size > 0 and b == VALIDATION_BUCKET)


def random_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    lo, hi = (0 if cfg.digits == 1 else 10 ** (cfg.digits - 1)), 10**cfg.digits - 1
    values = [rng.randint(lo, hi) for _ in range(cfg.operands)]
    text, total = str(values[0]), values[0]
    for v in values[1:]:
        op = rng.choice(cfg.ops)
        text += f"{op}{v}"
        total += v if op == "+" else -v
    return Problem(prompt=text + "=", answer=str(total))


def held_out_problems(cfg: TaskConfig, split: Literal["test", "validation"] = "test") -> list[Problem]:
    """A held-out set: the first `test_size` (or `validation_size`) distinct problems of the split's bucket
    in the task seed's stream."""
    test = split == "test"
    wanted, size = (TEST_BUCKET, cfg.test_size) if test else (VALIDATION_BUCKET, cfg.validation_size)
    rng, seen, out = random.Random(cfg.seed), set(), []
    for _ in range(200 * size + 10_000):
        if len(out) == size:
            return out
        p = random_problem(rng, cfg)
        if bucket(p.prompt) == wanted and p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    if len(out) == size:
        return out
    raise UserError(
        f"task.{split}_size={size} is more than this task has {split} problems ({len(out)} found); "
        f"lower task.{split}_size or raise task.digits / task.operands"
    )


def train_stream(cfg: TaskConfig, seed: int, start: int = 0) -> Iterator[Problem]:
    """Endless train problems for a run seed; `start` skips that many (the data cursor on resume)."""
    rng, index = random.Random(f"train-{cfg.seed}-{seed}"), 0
    while True:
        p = random_problem(rng, cfg)
        if is_held_out(p.prompt, cfg):
            continue
        if index >= start:
            yield p
        index += 1
