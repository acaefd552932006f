"""`env.name`: a built-in environment or `package.module:Class`, resolved before anything starts."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from asympo.errors import UserError

NAMED = {
    "calculator": "asympo.envs.calculator:Calculator",
    "guess": "asympo.envs.guess:Guess",
}


def load_env(spec: str, args: dict[str, Any]) -> Callable[[], Any]:
    """A factory of fresh environments; a bad spec or arguments are a one-line UserError now."""
    module_name, _, attr = NAMED.get(spec, spec).partition(":")
    if not module_name or not attr:
        names = ", ".join(f"'{n}'" for n in NAMED)
        raise UserError(
            f"env.name={spec!r}: expected one of {names} or an import path 'package.module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        why = f"importing {module_name} failed: " + f"{type(e).__name__}: {e}".splitlines()[0]
        if isinstance(e, ModuleNotFoundError) and f"{module_name}.".startswith(f"{e.name}."):
            why = f"module {module_name} not found"
        raise UserError(f"env.name={spec!r}: {why}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UserError(f"env.name={spec!r}: {module_name} has no attribute {attr}")
    try:
        probe = cls(**args)
    except Exception as e:
        raise UserError(
            f"env.name={spec!r} with env.args={args}: {type(e).__name__}: {e}".splitlines()[0]
        ) from None
    missing = [m for m in ("reset", "step") if not callable(getattr(probe, m, None))]
    if missing:
        raise UserError(f"env.name={spec!r}: {attr} is not an environment (no {' or '.join(missing)} method)")
    stop = getattr(probe, "stop", ())
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"env.name={spec!r}: {attr}.stop must be a list of non-empty strings")
    return lambda: cls(**args)
