"""Building a config: YAML files, presets and `key=value` overrides, validated into the pydantic classes.

An override key is a dotted path (`optim.lr=3e-4`) or, when unambiguous, just the leaf name (`lr=3e-4`).
Every problem (unknown key, wrong type, bad value, unreadable file) becomes a UserError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from asympo.config.commands import EvalConfig
from asympo.config.train import TrainConfig
from asympo.errors import UserError

Cfg = TypeVar("Cfg", bound=BaseModel)


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    """Map each field's leaf name to every dotted path that ends in it."""
    out: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        path = prefix + name
        out.setdefault(name, []).append(path)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for leaf, paths in _leaf_paths(sub, path + ".").items():
                out.setdefault(leaf, []).extend(paths)
    return out


def _resolve_key(model: type[BaseModel], key: str) -> list[str]:
    if "." in key or key in model.model_fields:
        return key.split(".")
    paths = _leaf_paths(model).get(key, [])
    if len(paths) == 1:
        return paths[0].split(".")
    if not paths:
        raise UserError(f"unknown config key '{key}'")
    raise UserError(f"config key '{key}' is ambiguous: use one of {', '.join(sorted(paths))}")


def _is_named_section(model: type[BaseModel], path: list[str]) -> bool:
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) else None
        model = field.annotation if field else None
    return isinstance(model, type) and issubclass(model, BaseModel) and "name" in model.model_fields


def apply_override(data: dict[str, Any], model: type[BaseModel], item: str) -> None:
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    path = _resolve_key(model, key.strip())
    if _is_named_section(model, path) and isinstance(value, str):
        path = [*path, "name"]  # `objective=spo` is short for `objective.name=spo`
    *parents, leaf = path
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{key}': '{part}' is not a section")
    node[leaf] = value


PRESETS = Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file, or a preset by name (`smollm2-arith`: asympo/configs/smollm2-arith.yaml)."""
    path = Path(path)
    if not path.exists() and str(path) == path.name and (PRESETS / f"{path}.yaml").exists():
        path = PRESETS / f"{path}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        presets = ", ".join(preset_names())
        raise UserError(f"config file not found: {path} (presets: {presets})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = "unknown config key" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"config {where}: {msg} (got {first.get('input')!r}){more}"


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_EVAL_FROM_ROLLOUT = ("temperature", "top_p", "max_new_tokens", "max_batch")


def eval_view(data: dict[str, Any]) -> dict[str, Any]:
    """A training config read by `asympo eval` (`eval -c smollm2-arith`): the same model, task, prompt, reward
    and sampling, the sections only training uses dropped. An eval config passes through unchanged."""
    if set(data) <= set(EvalConfig.model_fields):
        return data
    try:
        TrainConfig.model_validate(data)  # a typo in a training preset is named, not silently dropped
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
    view = {key: value for key, value in data.items() if key in EvalConfig.model_fields}
    rollout = data.get("rollout") or {}
    view |= {key: rollout[key] for key in _EVAL_FROM_ROLLOUT if key in rollout}
    if "reward_timeout" in (data.get("faults") or {}):
        view["reward_timeout"] = data["faults"]["reward_timeout"]
    return view


def build_config(model: type[Cfg], path: str | Path | None = None, overrides: list[str] = ()) -> Cfg:
    loaded = load_yaml(path) if path else {}
    if model is EvalConfig:
        loaded = eval_view(loaded)
    data = deep_merge(model().model_dump(), loaded)  # so a partial section keeps
    for item in overrides:  # its defaults, even where they differ from the section class's own
        apply_override(data, model, item)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
