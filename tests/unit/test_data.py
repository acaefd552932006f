"""Datasets from files and folders: field mapping, answer extraction, held-out splits, bad rows."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asympo.config import TaskConfig
from asympo.data.source import Task
from asympo.errors import UserError

ROWS = [
    {"q": f"What is {a} plus {a + 1}?", "sol": f"{a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1:,}"}
    for a in range(0, 3000, 7)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_task(name, **kw) -> TaskConfig:
    return TaskConfig(name=str(name), question_field="q", answer_field="sol", answer_format="gsm8k", **kw)


def test_jsonl_and_parquet_give_the_same_problems_with_gsm8k_answers(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    a, b = Task(gsm8k_task(jsonl)), Task(gsm8k_task(parquet))
    assert a.held_out() == b.held_out()
    assert list(itertools.islice(a.train(0), 50)) == list(itertools.islice(b.train(0), 50))
    problem = a.held_out()[0]
    number = int(problem.prompt.split()[2])
    assert problem.answer == str(2 * number + 1)  # '#### 1,234' -> '1234'


def test_hash_held_out_split_is_disjoint_and_each_epoch_covers_every_train_row(tmp_path):
    task = Task(gsm8k_task(write_jsonl(tmp_path / "d.jsonl", ROWS), test_size=1000))
    test = {p.prompt for p in task.held_out()}
    n_train = len(ROWS) - len(test)
    assert 0 < len(test) < len(ROWS) / 4
    first, second = (
        itertools.islice(task.train(0), n_train),
        itertools.islice(task.train(0, n_train), n_train),
    )
    first, second = [p.prompt for p in first], [p.prompt for p in second]
    assert set(first) == set(second) and len(set(first)) == n_train and not set(first) & test
    assert first != second  # a fresh order each epoch
    assert [p.prompt for p in itertools.islice(task.train(1), 20)] != first[:20]  # seeded by the run


def test_resume_cursor_continues_the_stream_without_replay(tmp_path):
    task = Task(gsm8k_task(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    full = list(itertools.islice(task.train(3), 1000))  # crosses an epoch boundary
    assert list(itertools.islice(task.train(3, start=377), 623)) == full[377:]


def test_separate_test_file_and_test_size(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:100])
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[100:130])
    task = Task(gsm8k_task(train, test=str(test), test_size=20))
    assert len(task.held_out()) == 20
    assert len({p.prompt for p in itertools.islice(task.train(0), 100)}) == 100


def test_json_list_and_plain_answers_with_a_prompt_renderer(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": f"{i}+1=", "answer": i + 1} for i in range(200)]))
    task = Task(TaskConfig(name=str(path)), render=lambda q: f"Q: {q}")
    problem = task.held_out()[0]
    assert problem.prompt.startswith("Q: ") and int(problem.answer) == int(problem.prompt[3:-3]) + 1


def test_dataset_folder_through_the_datasets_library(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:80])
    write_jsonl(folder / "test.jsonl", ROWS[80:90])
    task = Task(gsm8k_task(folder, test="test"))
    assert len(task.held_out()) == 10
    assert next(task.train(0)).prompt in {r["q"] for r in ROWS[:80]}


BAD = [
    ('{"q": "What is 1+1?", "sol": "#### 2"}\n', None),
    ('{"q": "", "sol": "#### 2"}\n', "question is empty"),
    ('{"sol": "#### 2"}\n', "missing field 'q'"),
    ('{"q": "x?", "sol": "2"}\n', "no '#### <final answer>'"),
    ("{not json\n", "not valid JSON"),
    (b'{"q": "caf\xe9?", "sol": "#### 1"}\n', "not valid UTF-8"),
    ("[1, 2]\n", "expected an object"),
]


@pytest.mark.parametrize("line, message", [b for b in BAD if b[1]])
def test_a_bad_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = BAD[0][0] * 3
    path.write_bytes(good.encode() + (line if isinstance(line, bytes) else line.encode()) + good.encode())
    with pytest.raises(UserError) as err:
        Task(gsm8k_task(path))
    assert f"{path}:4: " in str(err.value) and message in str(err.value)


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) + "\n" for r in ROWS[:60]] + [b[0] for b in BAD[1:]]
    path.write_bytes(b"".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    task = Task(gsm8k_task(path, skip_bad_rows=True))
    assert task.skipped == len(BAD) - 1
    assert len(task.held_out()) + len(task.train_rows) == 60


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.jsonl", "dataset file not found"),
        ("data.csv", "is not 'arith'"),
        ("no-such-org/no-such-dataset", "cannot be reached"),
    ],
)
def test_unusable_sources_are_user_errors(tmp_path, monkeypatch, name, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on this machine: no hub, and no waiting for one
    (tmp_path / "data.csv").write_text("q,a\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        Task(TaskConfig(name=name))
