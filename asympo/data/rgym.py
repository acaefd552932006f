"""`task.name=reasoning_gym:<dataset>`: procedural reasoning tasks from the `reasoning-gym` library (the
`reasoning-gym` extra), generated offline from a seed.

`task.size` problems are generated with the task's seed and `task.options` (the dataset's config keys); the
Task splits them into train, validation and test by a hash of the question, like any dataset, so no split
shares a problem. Each row's answer carries the whole entry and the dataset's options as JSON: the
`reasoning_gym` reward scores a response with the dataset's own `score_answer`, which may need the entry's
metadata and the options (a scorer's precision or tolerance).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from asympo.config import TaskConfig
from asympo.errors import UserError

PREFIX = "reasoning_gym:"


def is_reasoning_gym(name: str) -> bool:
    return name.startswith(PREFIX)


def reasoning_gym_records(cfg: TaskConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {question, answer}) records, as the file readers give them."""
    try:
        import reasoning_gym  # the `reasoning-gym` extra
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise UserError(
            f"task.name={cfg.name}: reasoning-gym is not installed (pip install 'asympo[reasoning-gym]')"
        ) from None
    name = cfg.name.removeprefix(PREFIX)
    if name not in DATASETS:
        near = [n for n in sorted(DATASETS) if name[:3] in n][:8] or sorted(DATASETS)[:8]
        raise UserError(f"task.name={cfg.name}: no reasoning-gym dataset '{name}' (e.g. {', '.join(near)})")
    try:
        dataset = reasoning_gym.create_dataset(name, size=cfg.size, seed=cfg.seed, **cfg.options)
    except (TypeError, ValueError, AssertionError) as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"task.name={cfg.name} with task.options={cfg.options}: {why}") from None
    seen = set()
    for index, entry in enumerate(dataset):
        if entry["question"] in seen:  # a procedural generator may repeat itself
            continue
        seen.add(entry["question"])
        answer = json.dumps({"entry": entry, "dataset": name, "options": cfg.options}, default=list)
        yield f"{cfg.name} item {index}", {"question": entry["question"], "answer": answer}
