"""`env.name`: a built-in environment or `package.module:Class`, resolved before anything starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asympo.errors import UserError
from asympo.specs import import_named

NAMED = {
    "calculator": "asympo.envs.calculator:Calculator",
    "guess": "asympo.envs.guess:Guess",
}


def load_env(spec: str, args: dict[str, Any]) -> Callable[[], Any]:
    """A factory of fresh environments; a bad spec or arguments are a one-line UserError now."""
    cls = import_named(f"env.name={spec!r}", spec, NAMED, "Class")
    attr = NAMED.get(spec, spec).partition(":")[2]
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
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"env.name={spec!r}: {attr}.stop must be a list of non-empty strings")
    return lambda: cls(**args)
