"""`task.name=verifiers:<module or file.py>`: the tasks of a `verifiers` taskset (the `verifiers` extra).

A taskset is a module exporting its `Taskset` subclass in `__all__` (verifiers' own convention), named as an
importable module or as a path to a `.py` file, whose folder is then put on the import path (and on
`PYTHONPATH`, for the tool servers verifiers starts as `python -m module`). `task.options` is the taskset's
config. Each task becomes a row: its prompt text as the question (what the held-out split hashes) and its
index in the taskset as the answer, which the rollout driver (`asympo.integrations.verifiers`) maps back to
the task object; the taskset's own rubric gives the reward.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asympo.config import TaskConfig
from asympo.errors import UserError

PREFIX = "verifiers:"
INSTALL = "pip install 'asympo[verifiers]', or ./run test-verifiers builds .venv-verifiers"


def is_verifiers(name: str) -> bool:
    return name.startswith(PREFIX)


def module_id(name: str) -> str:
    """The taskset's module name; a `.py` path puts its folder on the import path first."""
    source = name.removeprefix(PREFIX)
    if not source:
        raise UserError(f"task.name={name}: name a module or a .py file after 'verifiers:'")
    if not source.endswith(".py"):
        return source
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"task.name={name}: no file {path}")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    prepend_pythonpath(folder)
    return path.stem


def prepend_pythonpath(folder: str) -> None:
    """Put `folder` first on the PYTHONPATH the processes started from here inherit (once)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder, *parts])


def load_taskset(name: str, options: dict[str, Any]):
    """The taskset object; a missing library or module, or a module with no taskset, is a one-line error."""
    try:
        import verifiers.v1 as vf
        from verifiers.v1.utils.loaders import taskset_class, taskset_config_type
    except ImportError:
        raise UserError(f"task.name={name}: verifiers is not installed ({INSTALL})") from None
    mid = module_id(name)
    try:
        cls = taskset_class(mid)
        config = taskset_config_type(mid).model_validate({**options, "id": mid})
        taskset = cls(config)
        tasks = list(taskset)
    except Exception as e:  # the user's module: not found, no Taskset in __all__, bad options, load() raised
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"task.name={name}: not a verifiers taskset ({why})") from None
    if not tasks:
        raise UserError(f"task.name={name}: the taskset has no tasks")
    if not all(isinstance(t, vf.Task) for t in tasks):
        raise UserError(f"task.name={name}: the taskset yields objects that are not verifiers Tasks")
    return taskset, tasks


def prompt_text(task: Any) -> str:
    """A task's prompt as one string: the text, or its messages' contents joined."""
    prompt = task.data.prompt
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(getattr(m, "content", m)) for m in prompt or [])


def verifiers_records(cfg: TaskConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {question, answer}) records, as the file readers give them."""
    _, tasks = load_taskset(cfg.name, cfg.options)
    for index, task in enumerate(tasks):
        question = prompt_text(task)
        yield f"{cfg.name} task {index}", {"question": question, "answer": json.dumps({"verifiers": index})}


def task_index(answer: str) -> int:
    return int(json.loads(answer)["verifiers"])
