"""The configuration reference is generated from the config classes: docs/configuration.md must be exactly
what `python -m asympo.config.reference` prints, and every setting of every command must be documented
(a docstring under the field), so a new field without one fails here."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import asympo.config
from asympo.commands import COMMANDS
from asympo.config.reference import (
    COMMAND_CONFIGS,
    REGENERATE,
    reference_markdown,
    settings,
    settings_table,
)

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"


def command_configs() -> dict[str, type[BaseModel]]:
    """Every command's config class, as the command line finds it (asympo.commands.COMMANDS)."""
    return {command: getattr(asympo.config, name) for command, (name, _) in COMMANDS.items()}


def models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The config classes a field's type holds: a section, or the items of a list (`prompt.fewshot`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from models_in(arg)


def fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field under `model`, sections and the fields of list items included, as (dotted key, field)."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for sub in models_in(field.annotation):
            yield from fields(sub, f"{prefix}{name}.")


def test_configuration_doc_is_generated_from_the_config_classes():
    expected = reference_markdown()
    actual = DOC.read_text() if DOC.exists() else ""
    if actual != expected:
        diff = difflib.unified_diff(
            actual.splitlines(), expected.splitlines(), "docs/configuration.md", "generated", lineterm=""
        )
        pytest.fail(
            f"docs/configuration.md is out of date: regenerate it with `{REGENERATE}`\n"
            + "\n".join(list(diff)[:40])
        )


def test_the_reference_covers_every_command_with_its_config_class():
    assert list(command_configs().items()) == list(COMMAND_CONFIGS.items())  # same order too


def test_every_setting_of_every_command_has_a_description():
    missing = [
        f"{command}: {key}"
        for command, model in command_configs().items()
        for key, field in fields(model)
        if not (field.description or "").strip()
    ]
    assert not missing, (
        "settings without a description: give each a docstring (a string literal on the line under the "
        f"field, in asympo/config/), then run `{REGENERATE}`: {missing}"
    )


def test_every_config_class_has_a_docstring():
    classes = {
        sub
        for model in command_configs().values()
        for _, f in fields(model)
        for sub in models_in(f.annotation)
    }
    undocumented = sorted(c.__name__ for c in classes | set(command_configs().values()) if not c.__doc__)
    assert not undocumented, f"config classes without a docstring: {undocumented}"


def test_the_reference_lists_every_setting_once_with_its_default_and_description():
    def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            section = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            out += (
                [f"{prefix}{name}.*", *keys(field.annotation, f"{prefix}{name}.")]
                if section
                else [prefix + name]
            )
        return out

    rows = {s.key: s for s in settings(asympo.config.TrainConfig)}
    assert list(rows) == keys(asympo.config.TrainConfig)
    assert rows["optim.lr"].default == "0.0001"
    assert rows["optim.lr"].description.startswith("AdamW learning rate")
    assert rows["optim.*"].default == "" and rows["optim.*"].description
    assert rows["task.subset"].default == "null" and rows["task.test"].default == '""'
    assert rows["prompt.template"].default == '"{question}"'  # YAML would read {question} as a mapping


def test_study_base_shows_the_study_defaults_where_they_differ_from_train():
    rows = {s.key: s.default for s in settings(asympo.config.StudyConfig)}
    assert rows["base.steps"] == "150" and rows["base.task.validation_size"] == "200"
    assert "base.optim.lr" not in rows  # the same as train's: see its table
    assert "base.*" in rows


def test_markdown_cells_escape_pipes():
    class Piped(asympo.config.Strict):
        """A config whose description holds a pipe."""

        flag: str = "a|b"
        """Either a | b."""

    assert "| `flag` | `a\\|b` | Either a \\| b. |" in settings_table(Piped)
