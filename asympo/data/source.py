"""A task as the runtimes see it: an endless seeded train stream and a fixed held-out list of prompts.

The built-in arithmetic generates problems; a dataset is read once, its rows checked, and then replayed
in a fresh seeded order every epoch. Prompts are rendered (template, few-shot, chat) here, once, so that
engines and workers receive plain text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

from asympo.config import TaskConfig
from asympo.data.files import FILE_SUFFIXES, Row, check_rows, raw_rows
from asympo.data.hub import dataset_records
from asympo.data.rgym import is_reasoning_gym, reasoning_gym_records
from asympo.data.tasks import VALIDATION_BUCKET, Problem, bucket, held_out_problems, is_test, train_stream
from asympo.data.verifiers import is_verifiers, verifiers_records
from asympo.errors import UserError


def _records(cfg: TaskConfig, source: str, split: str):
    if is_reasoning_gym(source):
        return reasoning_gym_records(cfg)
    if is_verifiers(source):
        return verifiers_records(cfg)
    path = Path(source).expanduser()
    if path.suffix in FILE_SUFFIXES:
        return raw_rows(path)
    if path.is_dir() or source.count("/") == 1:
        return dataset_records(source, cfg.subset, split)
    raise UserError(
        f"task '{source}' is not 'arith', a {'/'.join(FILE_SUFFIXES)} file, a dataset folder, a hub id, "
        "reasoning_gym:<dataset> or verifiers:<module or file.py>"
    )


class Task:
    def __init__(self, cfg: TaskConfig, render: Callable[[str], str] = lambda q: q):
        self.cfg, self.render, self.skipped = cfg, render, 0
        if self.builtin:
            return
        rows, self.skipped = check_rows(_records(cfg, cfg.name, cfg.split), cfg)
        if cfg.test:
            is_file = Path(cfg.test).suffix in FILE_SUFFIXES  # else a split of the same dataset
            source, split = (cfg.test, "") if is_file else (cfg.name, cfg.test)
            if not is_file and Path(cfg.name).suffix in FILE_SUFFIXES:
                raise UserError(f"task.test={cfg.test!r}: a file dataset's held-out set must be a file too")
            test, skipped = check_rows(_records(cfg, source, split), cfg)
            self.skipped += skipped
        else:  # hold out by a hash of the question: a property of the row, stable across file orders
            test = [r for r in rows if is_test(r.question)]
            rows = [r for r in rows if not is_test(r.question)]
        self.validation_rows = []
        if cfg.validation_size:  # a second hash bucket of the training rows, never trained on
            self.validation_rows = [r for r in rows if bucket(r.question) == VALIDATION_BUCKET]
            rows = [r for r in rows if bucket(r.question) != VALIDATION_BUCKET]
            if not self.validation_rows:
                raise UserError(f"task '{cfg.name}' has too few rows for a validation set")
            self.validation_rows = self.validation_rows[: cfg.validation_size]
        if not rows:
            raise UserError(f"task '{cfg.name}' has no usable training rows")
        if not test:
            raise UserError(f"task '{cfg.name}' has no held-out rows; set task.test to a split or file")
        self.train_rows, self.test_rows = rows, test[: cfg.test_size]

    @property
    def builtin(self) -> bool:
        return self.cfg.name == "arith"

    def problem(self, row: Row | Problem) -> Problem:
        question = row.question if isinstance(row, Row) else row.prompt
        return Problem(prompt=self.render(question), answer=row.answer)

    def held_out(self) -> list[Problem]:
        rows = held_out_problems(self.cfg) if self.builtin else self.test_rows
        return [self.problem(r) for r in rows]

    def validation(self) -> list[Problem]:
        """Empty unless task.validation_size > 0."""
        if not self.cfg.validation_size:
            return []
        rows = held_out_problems(self.cfg, "validation") if self.builtin else self.validation_rows
        return [self.problem(r) for r in rows]

    def train(self, seed: int, start: int = 0) -> Iterator[Problem]:
        """Endless; `start` skips that many problems (the data cursor), so a resume never replays data."""
        if self.builtin:
            yield from map(self.problem, train_stream(self.cfg, seed, start))
            return
        n, index = len(self.train_rows), start
        while True:
            epoch = index // n
            order = list(range(n))
            random.Random(f"epoch-{self.cfg.seed}-{seed}-{epoch}").shuffle(order)
            for position in range(index % n, n):
                yield self.problem(self.train_rows[order[position]])
            index = (epoch + 1) * n
