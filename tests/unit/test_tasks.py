from __future__ import annotations

import itertools
import json

import pytest

from asympo.config import TaskConfig
from asympo.data.source import Task
from asympo.data.tasks import held_out_problems, is_test, train_stream
from asympo.errors import UserError
from asympo.rewards.exact import exact_match


def test_answers_are_correct_arithmetic():
    cfg = TaskConfig(operands=4, digits=2, ops="+-")
    for p in itertools.islice(train_stream(cfg, seed=3), 200):
        assert p.prompt.endswith("=")
        assert eval(p.prompt[:-1]) == int(p.answer)  # noqa: S307 - our own generated digits and +/-


def test_train_and_test_never_share_a_problem():
    cfg = TaskConfig(operands=2, digits=2, test_size=300)
    test = {p.prompt for p in held_out_problems(cfg)}
    train = {p.prompt for p in itertools.islice(train_stream(cfg, seed=0), 20_000)}
    assert len(test) == 300
    assert not test & train
    assert all(is_test(p) for p in test) and not any(is_test(p) for p in train)


def test_validation_set_is_disjoint_from_test_and_never_trained_on():
    plain, cfg = TaskConfig(), TaskConfig(validation_size=150)
    validation = {p.prompt for p in held_out_problems(cfg, "validation")}
    test = {p.prompt for p in held_out_problems(cfg)}
    train = {p.prompt for p in itertools.islice(train_stream(cfg, seed=0), 20_000)}
    assert len(validation) == 150 and not validation & test and not validation & train
    assert held_out_problems(cfg) == held_out_problems(plain)  # the test set does not move
    plain_train = {p.prompt for p in itertools.islice(train_stream(plain, seed=0), 20_000)}
    assert validation & plain_train  # without a validation set those problems are trained on
    assert Task(cfg).validation() == held_out_problems(cfg, "validation") and Task(plain).validation() == []
    with pytest.raises(UserError, match="validation_size"):
        held_out_problems(TaskConfig(operands=2, digits=1, validation_size=500), "validation")


def test_dataset_validation_rows_come_out_of_the_training_rows(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(400)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = Task(TaskConfig(name=str(path), validation_size=10))
    validation = {p.prompt for p in task.validation()}
    trained = {p.prompt for p in itertools.islice(task.train(0), 400)}
    assert len(validation) == 10 and not validation & trained
    assert not validation & {p.prompt for p in task.held_out()}


def test_seeded_and_reproducible():
    cfg = TaskConfig()
    assert held_out_problems(cfg) == held_out_problems(cfg)
    a = list(itertools.islice(train_stream(cfg, seed=1), 50))
    assert a == list(itertools.islice(train_stream(cfg, seed=1), 50))
    assert a != list(itertools.islice(train_stream(cfg, seed=2), 50))
    assert held_out_problems(cfg) != held_out_problems(cfg.model_copy(update={"seed": 99}))


def test_stream_start_skips_exactly_the_consumed_problems():
    cfg = TaskConfig()
    full = list(itertools.islice(train_stream(cfg, seed=0), 30))
    assert list(itertools.islice(train_stream(cfg, seed=0, start=10), 20)) == full[10:]


def test_too_small_a_task_for_the_test_size_is_a_clear_error():
    with pytest.raises(UserError, match="test_size"):
        held_out_problems(TaskConfig(operands=2, digits=1, test_size=500))


def test_bad_ops_rejected():
    with pytest.raises(ValueError, match="ops"):
        TaskConfig(ops="*")


@pytest.mark.parametrize(
    ("text", "answer", "reward"),
    [
        ("42", "42", 1.0),
        (" 42 ", "42", 1.0),
        ("4 2", "42", 0.0),
        ("-7", "-7", 1.0),
        ("7", "-7", 0.0),
        ("", "0", 0.0),
    ],
)
def test_exact_match(text, answer, reward):
    assert exact_match(text, answer) == reward
