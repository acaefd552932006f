"""The settings reference, generated from the config classes' field docstrings: `asympo <command> --help`
prints it, and docs/configuration.md is written from it (a test fails when the two drift).

    python -m asympo.config.reference > docs/configuration.md
"""

from __future__ import annotations

import json
import textwrap
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel

from asympo.config.commands import BenchConfig, EvalConfig, ServeConfig, SFTConfig, StudyConfig
from asympo.config.train import TrainConfig

# command -> its config class, in the order of the reference. asympo.commands.COMMANDS names the same classes
# (a unit test checks that the two agree); it is not imported here, as config imports nothing above it.
COMMAND_CONFIGS: dict[str, type[BaseModel]] = {
    "train": TrainConfig,
    "sft": SFTConfig,
    "eval": EvalConfig,
    "study": StudyConfig,
    "serve": ServeConfig,
    "bench": BenchConfig,
}

REGENERATE = "python -m asympo.config.reference > docs/configuration.md"


class Setting(NamedTuple):
    key: str
    """Dotted path (`optim.lr`); a section's row is its name with `.*` (`optim.*`)."""
    default: str
    """As it would be typed on the command line; empty for a section."""
    description: str
    """The field's docstring, on one line."""


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def settings(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[Setting]:
    """Every setting of `model` in declaration order: each section's own row, then its keys. Defaults are
    read from `defaults` (a section's default instance), so `asympo study`'s `base.*` shows its own. A
    section that is another command's whole config (study's `base`) lists only the defaults that differ."""
    rows: list[Setting] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        value = field.get_default(call_default_factory=True) if defaults is None else getattr(defaults, name)
        description = " ".join((field.description or "").split())
        sub = field.annotation
        if not is_section(sub):
            rows.append(Setting(key, shown(value), description))
            continue
        inner = settings(sub, key + ".", value if isinstance(value, BaseModel) else None)
        command = next((c for c, cls in COMMAND_CONFIGS.items() if cls is sub), None)
        if command:
            own = {s.key: s.default for s in settings(sub, key + ".")}
            inner = [s for s in inner if not s.key.endswith(".*") and s.default != own[s.key]]
            description += (
                f" Its keys are those of `asympo {command}`; listed here: the defaults that differ."
            )
        rows += [Setting(key + ".*", "", description), *inner]
    return rows


def shown(value: Any) -> str:
    """A default as it would be typed on the command line (`key=value`, the value read as YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):  # quoted where YAML would read it as something else ("", "{question}", "on")
        return value if value and read_back(value) == value else json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{shown(k)}: {shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.model_dump().items()) + "}"
    return str(value)


def read_back(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def settings_help(model: type[BaseModel]) -> str:
    """The epilog of `asympo <command> --help`: every key, its default and what it does."""
    lines = ["settings (key=value, or a leaf name alone when unambiguous; the default after '='):"]
    for key, default, description in settings(model):
        lines.append(f"  {key}" if key.endswith(".*") else f"  {key} = {default}")
        if description:
            indent = " " * 6
            lines += textwrap.wrap(
                description, 100, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
            )
    return "\n".join(lines)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table(model: type[BaseModel]) -> str:
    rows = ["| key | default | description |", "|---|---|---|"]
    for key, default, description in settings(model):
        shown_default = f"`{cell(default)}`" if default else ""
        rows.append(f"| `{cell(key)}` | {shown_default} | {cell(description)} |")
    return "\n".join(rows)


INTRO = f"""\
# Configuration reference

<!-- Generated from the config classes' field docstrings (asympo/config/): edit those, not this file, then
run `{REGENERATE}`.
tests/unit/test_docs.py fails when the two drift. -->

Every command reads its settings in three layers: the defaults below, then a YAML file (`--config FILE` or
`-c FILE`), then `key=value` overrides on the command line.

- **YAML**: the same keys as nested mappings (`optim: {{lr: 3.0e-4}}`); a partial section keeps the
  defaults of the keys it leaves out.
- **Presets**: `--config` also takes a preset by name, one of the files in `asympo/configs/` (`asympo train
  -c smollm2-arith`, `asympo study -c study-updates`).
- **Overrides**: `key=value` with a dotted key (`optim.lr=3e-4`), the value read as YAML
  (`runtime.worker_devices=[cuda:1,cuda:2]`, `prompt.system=null`). A leaf name alone is enough when it is
  unambiguous (`lr=3e-4`, `lag=4`); an ambiguous one is an error that names the full keys.
- **Named sections**: `objective=spo` is short for `objective.name=spo` (and `task=FILE` for
  `task.name=FILE`).
- An unknown key, a bad value or an unreadable file ends with one line naming the problem (exit code 2).
- `asympo <command> --help` prints the same settings. A section's own row is `section.*`. Defaults are
  written as YAML values: `null` is unset, and a quoted one (`""`, `"{{question}}"`) needs its quotes, on a
  shell inside single quotes (`'prompt.template="Q: {{question}}"'`).
- `asympo eval` also takes a training config (`asympo eval -c smollm2-arith`): that run's model, task, prompt
  and reward, its `rollout` sampling settings and `faults.reward_timeout`; the sections only training uses
  are ignored.
"""


def reference_markdown() -> str:
    """The whole of docs/configuration.md: how to set keys, then one table per command."""
    parts = [INTRO]
    for command, model in COMMAND_CONFIGS.items():
        summary = " ".join((model.__doc__ or "").split("\n\n")[0].split())
        summary = summary.removeprefix(f"`asympo {command}`: ")
        summary = summary[:1].upper() + summary[1:]
        parts.append(f"## `asympo {command}`\n\n{summary}\n\n{settings_table(model)}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference_markdown(), end="")
