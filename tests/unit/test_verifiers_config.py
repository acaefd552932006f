"""`task.name=verifiers:<module>` in the configuration, without verifiers installed (the main environment
never has it): the environment follows the task, conflicting settings are one-line errors, and a missing
library says how to get it. The adapter itself runs in ./.venv-verifiers (tests_verifiers/)."""

from __future__ import annotations

import importlib.util

import pytest
from pydantic import ValidationError

from asympo.config import EnvConfig, EvalConfig, TaskConfig, TrainConfig
from asympo.data.source import Task
from asympo.data.verifiers import module_id
from asympo.envs.episodes import make_episodes
from asympo.errors import UserError

NAME = "verifiers:my_env"


@pytest.mark.parametrize("config", [TrainConfig, EvalConfig])
def test_the_environment_follows_a_verifiers_task_with_its_options(config):
    cfg = config.model_validate(
        {"task": {"name": NAME, "options": {"size": 40}}, "env": {"args": {"rounds": 3}}}
    )
    assert cfg.env.name == NAME
    assert cfg.env.args == {"rounds": 3, "taskset": {"size": 40}}
    assert (
        config.model_validate(cfg.model_dump()).env == cfg.env
    )  # a saved config (resume) reads back the same
    assert config.model_validate({}).env.name is None


def test_an_environment_of_its_own_or_a_verifiers_env_without_the_task_is_refused():
    with pytest.raises(ValidationError, match="leave env.name unset"):
        TrainConfig.model_validate({"task": {"name": NAME}, "env": {"name": "calculator"}})
    with pytest.raises(ValidationError, match="named by task.name"):
        TrainConfig.model_validate({"env": {"name": NAME}})


def test_a_missing_taskset_file_is_one_line():
    with pytest.raises(UserError, match="no file"):
        module_id("verifiers:/nowhere/my_env.py")
    with pytest.raises(UserError, match="name a module"):
        module_id("verifiers:")
    assert module_id("verifiers:pkg.my_env") == "pkg.my_env"


@pytest.mark.skipif(importlib.util.find_spec("verifiers") is not None, reason="verifiers is installed here")
def test_without_verifiers_installed_the_error_says_how_to_get_it():
    with pytest.raises(UserError, match=r"verifiers is not installed \(pip install 'asympo\[verifiers\]'"):
        Task(TaskConfig(name=NAME))
    with pytest.raises(UserError, match="verifiers is not installed"):
        make_episodes(EnvConfig(name=NAME), tokenizer=None)
