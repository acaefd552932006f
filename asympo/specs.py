"""Settings that name code (`reward`, `env.name`): a built-in short name or an import path
`package.module:attribute`, resolved when the config is read, so a typo is one line before anything starts."""

from __future__ import annotations

import importlib
from typing import Any

from asympo.errors import UserError


def import_named(label: str, spec: str, named: dict[str, str], kind: str) -> Any:
    """The attribute `spec` names; `label` starts each error (`reward 'x'`), `kind` is what the import path
    ends in (`function`, `Class`)."""
    module_name, _, attr = named.get(spec, spec).partition(":")
    if not module_name or not attr:
        names = ", ".join(f"'{n}'" for n in named)
        raise UserError(f"{label}: expected one of {names} or an import path 'package.module:{kind}'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a missing or broken user module is bad input, not a crash of ours
        why = f"importing {module_name} failed: " + f"{type(e).__name__}: {e}".splitlines()[0]
        if isinstance(e, ModuleNotFoundError) and f"{module_name}.".startswith(f"{e.name}."):
            why = f"module {module_name} not found"
        raise UserError(f"{label}: {why}") from None
    found = getattr(module, attr, None)
    if found is None:
        raise UserError(f"{label}: {module_name} has no attribute {attr}")
    return found
