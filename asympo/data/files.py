"""Question/answer rows from local files (JSONL, JSON, Parquet) and dataset libraries, checked row by row.

Every bad row is reported with its file and line (or row number), so a broken dataset is fixed in one go
rather than by bisection; with `skip_bad_rows` it is skipped and counted instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asympo.data.answers import last_boxed
from asympo.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Row:
    question: str
    answer: str


class BadRow(ValueError):
    pass


def raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs; `where` is 'file:line' for JSONL and 'file row N' otherwise."""
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield where, BadRow("not valid UTF-8 text")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRow(f"not valid JSON ({e.msg})")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a valid UTF-8 JSON file ({e})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json dataset must hold a list of objects")
        yield from ((f"{path} row {i}", record) for i, record in enumerate(data, 1))
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading Parquet needs pyarrow: pip install 'asympo[real]'") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
            raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        yield from ((f"{path} row {i}", record) for i, record in enumerate(table.to_pylist(), 1))
    else:
        raise UserError(f"dataset file {path}: unknown format (expected {', '.join(FILE_SUFFIXES)})")


def extract_answer(value: Any, answer_format: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRow(f"answer is not text or a number ({type(value).__name__})")
    text = str(value).strip()
    if answer_format == "gsm8k":
        if "####" not in text:
            raise BadRow("answer has no '#### <final answer>' line")
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_format == "boxed":
        text = last_boxed(text) or ""
        if not text:
            raise BadRow("answer has no \\boxed{} final answer")
    if not text:
        raise BadRow("answer is empty")
    return text


def to_row(record: Any, question_field: str, answer_field: str, answer_format: str) -> Row:
    if isinstance(record, BadRow):
        raise record
    if not isinstance(record, dict):
        raise BadRow(f"expected an object with fields, got {type(record).__name__}")
    for name in (question_field, answer_field):
        if name not in record or record[name] is None:
            raise BadRow(f"missing field '{name}' (fields: {', '.join(map(str, record)) or 'none'})")
    question = record[question_field]
    if not isinstance(question, str) or not question.strip():
        raise BadRow("question is empty" if isinstance(question, str) else "question is not text")
    return Row(question.strip(), extract_answer(record[answer_field], answer_format))


def check_rows(records: Iterable[tuple[str, Any]], cfg: Any) -> tuple[list[Row], int]:
    """Map records to rows with the task's field mapping; returns the rows and how many were skipped."""
    rows, skipped = [], 0
    for where, record in records:
        try:
            rows.append(to_row(record, cfg.question_field, cfg.answer_field, cfg.answer_format))
        except BadRow as e:
            if not cfg.skip_bad_rows:
                raise UserError(f"{where}: {e} (task.skip_bad_rows=true skips such rows)") from None
            skipped += 1
    return rows, skipped
