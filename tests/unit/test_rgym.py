"""reasoning-gym tasks: seeded generation split into train, validation and test without overlap, the
dataset's own scorer as the reward, and one-line errors for a bad dataset name or option."""

from __future__ import annotations

import json
import sys

import pytest

from asympo.config import EvalConfig, TaskConfig, TrainConfig, build_config
from asympo.data.source import Task
from asympo.errors import UserError
from asympo.rewards.guard import load_reward
from asympo.rewards.rgym import extracted, reasoning_gym_reward, scorer

pytest.importorskip("reasoning_gym")
TASK = TaskConfig(name="reasoning_gym:basic_arithmetic", size=400, test_size=40, validation_size=30)


def test_the_splits_never_share_a_problem_and_repeat_for_a_seed():
    task = Task(TASK)
    train, test, validation = (
        {r.question for r in rows} for rows in (task.train_rows, task.test_rows, task.validation_rows)
    )
    assert (len(test), len(validation)) == (40, 30) and len(train) > 250
    assert not (train & test or train & validation or test & validation)
    assert [p.prompt for p in Task(TASK).held_out()] == [p.prompt for p in task.held_out()]
    other = Task(TASK.model_copy(update={"seed": 7}))
    assert [p.prompt for p in other.held_out()] != [p.prompt for p in task.held_out()]


def test_the_reward_is_the_datasets_own_score_of_the_extracted_answer():
    problem = Task(TASK).held_out()[0]
    answer = json.loads(problem.answer)["entry"]["answer"]
    assert reasoning_gym_reward(f"thinking...\n<answer> {answer} </answer>", problem.answer) == 1.0
    assert reasoning_gym_reward(f"so it is\n{answer}\n", problem.answer) == 1.0  # untagged: the last line
    assert reasoning_gym_reward("<answer>12345678</answer>", problem.answer) == 0.0
    assert extracted("<answer>1</answer> and <answer>2</answer>") == "2" and extracted("  ") == ""
    assert load_reward("reasoning_gym") is reasoning_gym_reward


def test_reasoning_gym_tasks_default_to_their_own_scorer():
    task = {"name": "reasoning_gym:gcd"}
    assert TrainConfig.model_validate({"task": task}).reward == "reasoning_gym"
    assert TrainConfig.model_validate({"task": task, "reward": "math"}).reward == "math"
    assert build_config(TrainConfig, None, ["task.name=reasoning_gym:gcd"]).reward == "reasoning_gym"
    assert EvalConfig.model_validate({"task": task}).reward == "reasoning_gym"
    assert TrainConfig().reward == "exact"


@pytest.mark.parametrize(
    ("update", "words"),
    [
        ({"name": "reasoning_gym:basic_arithmetc"}, "no reasoning-gym dataset 'basic_arithmetc' (e.g. "),
        ({"options": {"min_terms": 5, "max_terms": 2}}, "task.options={'min_terms': 5, 'max_terms': 2}: "),
        ({"options": {"no_such_key": 1}}, "TypeError"),
    ],
)
def test_a_bad_dataset_or_option_is_one_line(update, words):
    with pytest.raises(UserError) as e:
        Task(TASK.model_copy(update=update))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(UserError, match=r"pip install 'asympo\[reasoning-gym\]'"):
        Task(TASK)


def test_the_scorer_is_built_with_the_tasks_options():
    problem = Task(TASK.model_copy(update={"options": {"max_terms": 2}})).held_out()[0]
    row = json.loads(problem.answer)
    assert row["dataset"] == "basic_arithmetic" and row["options"] == {"max_terms": 2}
    assert scorer("basic_arithmetic", json.dumps({"max_terms": 2})).__self__.config.max_terms == 2
