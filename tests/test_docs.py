"""The README's configuration reference must list every `asympo train` key with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from asympo.config import TrainConfig

README = (Path(__file__).parents[1] / "README.md").read_text()


def leaf_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= leaf_defaults(field.annotation, f"{prefix}{name}.")
        else:
            out[prefix + name] = field.default
    return out


def documented_defaults() -> dict[str, str]:
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+?) \|", README, flags=re.M)
    return {key: cell.strip().strip("`") for key, cell in rows}


def test_every_train_key_is_documented():
    missing = [key for key in leaf_defaults(TrainConfig) if f"`{key}`" not in README]
    assert not missing, f"README config reference lacks: {missing}"


def test_documented_defaults_match_the_code():
    documented = documented_defaults()
    checked = 0
    for key, default in leaf_defaults(TrainConfig).items():
        cell = documented.get(key)
        if cell is None or default is None:
            continue
        if isinstance(default, bool):
            assert cell == str(default).lower(), key
        elif isinstance(default, int | float):
            assert float(cell) == default, key
        else:
            assert cell == str(default), key
        checked += 1
    assert checked >= 30  # the table really is being read
