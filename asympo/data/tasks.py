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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from asympo.errors import UserError

TEST_BUCKETS = 10  # one problem in ten is held out


class TaskConfig(BaseModel):
    """Where problems come from: the built-in arithmetic (`12+34-56=`) or a dataset of question/answer rows.
    Dataset fields are ignored by arith and arith fields by datasets."""

    model_config = ConfigDict(extra="forbid")

    name: str = "arith"  # "arith", a .jsonl / .json / .parquet file, a dataset folder, or a hub id (org/name)
    operands: int = Field(2, ge=2, le=8)  # arith only, like digits and ops
    digits: int = Field(2, ge=1, le=6)
    ops: str = "+"
    subset: str | None = None  # datasets: the hub config name, e.g. "main" for openai/gsm8k
    split: str = "train"  # datasets: the split to train on (hub ids and folders)
    test: str = (
        ""  # datasets: held-out split name or file; "" holds out 1 row in 10 by a hash of its question
    )
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: Literal["plain", "gsm8k", "boxed"] = "plain"  # gsm8k: after '####'; boxed: last \boxed{}
    skip_bad_rows: bool = False  # skip and count bad rows instead of stopping at the first one
    test_size: int = Field(200, ge=1)  # held-out problems used (datasets: at most this many)
    seed: int = 1234  # fixes the arith test set; the train stream is seeded by the run's seed

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: str) -> str:
        if not v or set(v) - set("+-"):
            raise ValueError(f"ops must be a non-empty subset of '+-', got {v!r}")
        return v


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def is_test(prompt: str) -> bool:
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % TEST_BUCKETS == 0


def random_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    lo, hi = (0 if cfg.digits == 1 else 10 ** (cfg.digits - 1)), 10**cfg.digits - 1
    values = [rng.randint(lo, hi) for _ in range(cfg.operands)]
    text, total = str(values[0]), values[0]
    for v in values[1:]:
        op = rng.choice(cfg.ops)
        text += f"{op}{v}"
        total += v if op == "+" else -v
    return Problem(prompt=text + "=", answer=str(total))


def held_out_problems(cfg: TaskConfig) -> list[Problem]:
    """The held-out set: the first `test_size` distinct test-bucket problems of the task seed's stream."""
    rng, seen, out = random.Random(cfg.seed), set(), []
    for _ in range(200 * cfg.test_size + 10_000):
        p = random_problem(rng, cfg)
        if is_test(p.prompt) and p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
            if len(out) == cfg.test_size:
                return out
    raise UserError(
        f"task.test_size={cfg.test_size} is more than this task has held-out problems ({len(out)} found); "
        "lower task.test_size or raise task.digits / task.operands"
    )


def train_stream(cfg: TaskConfig, seed: int, start: int = 0) -> Iterator[Problem]:
    """Endless train problems for a run seed; `start` skips that many (the data cursor on resume)."""
    rng, index = random.Random(f"train-{cfg.seed}-{seed}"), 0
    while True:
        p = random_problem(rng, cfg)
        if is_test(p.prompt):
            continue
        if index >= start:
            yield p
        index += 1
