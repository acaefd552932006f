"""The README's configuration references must list every `asympo train` and `asympo study` key, with the
train keys' real defaults."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from asympo.config import StudyConfig, TrainConfig

README = (Path(__file__).parents[1] / "README.md").read_text()


def section(heading: str) -> str:
    start = README.index(heading)
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


TRAIN_REFERENCE = section("## Configuration reference (`asympo train`)")
STUDY_REFERENCE = section("## The staleness study (`asympo study`)")


def leaf_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= leaf_defaults(field.annotation, f"{prefix}{name}.")
        else:
            out[prefix + name] = field.default
    return out


def documented_defaults() -> dict[str, str]:
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+?) \|", TRAIN_REFERENCE, flags=re.M)
    return {key: cell.strip().strip("`") for key, cell in rows}


def test_every_train_key_is_documented():
    missing = [key for key in leaf_defaults(TrainConfig) if f"`{key}`" not in TRAIN_REFERENCE]
    assert not missing, f"README config reference lacks: {missing}"


def test_every_study_key_is_documented():
    keys = [f"`{k}.*`" if k == "base" else f"`{k}`" for k in StudyConfig.model_fields]
    missing = [key for key in keys if key not in STUDY_REFERENCE]
    assert not missing, f"README study reference lacks: {missing}"


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
        elif default == "":
            assert cell in ('""', "empty"), key
        else:
            assert cell == str(default), key
        checked += 1
    assert checked >= 30  # the table really is being read
