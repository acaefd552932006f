"""The code's shape (CONTRIBUTING.md): the rules import-linter cannot state. The layer contracts themselves
run in `./run lint` (pyproject.toml, [tool.importlinter])."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import asympo
from asympo.runtime.base import Runtime
from asympo.runtime.lag import LagRuntime
from asympo.runtime.local_async import AsyncRuntime
from asympo.runtime.remote_async import RemoteAsyncRuntime

PACKAGE = Path(asympo.__file__).parent
# what may be imported inside a function: the optional extras, and asympo's modules that need one
OPTIONAL = {
    "vllm", "ray", "peft", "wandb", "verl", "matplotlib", "datasets", "pyarrow", "uvicorn", "starlette",
    "torch.utils.tensorboard", "asympo.rollout.vllm", "asympo.runtime.ray_backend", "asympo.serve.app",
    "asympo.serve.server", "reasoning_gym", "verifiers", "asympo.models.lora_linear", "zstandard",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(node, the module it imports, inside a function?) for every import of a file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        up, in_function = node, False
        while up in parents and not in_function:
            up = parents[up]
            in_function = isinstance(up, ast.FunctionDef | ast.AsyncFunctionDef)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, in_function
        elif node.level == 0:
            yield node, node.module, in_function


FILES = sorted(PACKAGE.rglob("*.py"))


def test_imports_inside_functions_are_for_optional_extras_and_say_so():
    found = []
    for path in FILES:
        lines = path.read_text().splitlines()
        for node, module, in_function in imports(path):
            if not in_function:
                continue
            optional = any(module == o or module.startswith(o + ".") for o in OPTIONAL)
            said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith(("#", "try:"))
            if not optional:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {module}")
            elif not said and not lines[node.lineno - 2].strip().startswith(("import ", "from ")):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: no comment on why {module}")
    assert not found, "\n".join(found)


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in FILES:
        for node, module, _ in imports(path):
            across = module.startswith("asympo") and module != module_name(path)
            if isinstance(node, ast.ImportFrom) and across:
                private = [a.name for a in node.names if a.name[0] == "_"]
                found += [f"{module_name(path)} imports {module}.{name}" for name in private]
    assert not found, "\n".join(found)


def test_product_code_never_imports_the_benchmarks():
    found = [
        f"{module_name(path)} imports {module}"
        for path in FILES
        if not module_name(path).startswith(("asympo.bench", "asympo.commands.bench"))
        for _, module, _ in imports(path)
        if module.startswith(("asympo.bench", "benchmarks"))
    ]
    assert not found, "\n".join(found)


def test_no_init_file_holds_a_command_body():
    """`__init__.py` files hold docstrings, imports and registries: no functions or classes."""
    found = []
    for path in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(path.read_text())
        found += [
            f"{module_name(path)}.{node.name}"
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
    assert not found, "\n".join(found)


def runtime_classes() -> list[type]:
    classes = [LagRuntime, AsyncRuntime, RemoteAsyncRuntime]
    if pytest.importorskip("ray", reason="the Ray runtime needs the ray extra"):
        from asympo.runtime.ray_backend import RayRuntime  # the `ray` extra

        classes.append(RayRuntime)
    return classes


def attributes_set(cls: type) -> set[str]:
    """Names a class defines: class attributes and annotations, properties, and `self.x = ...` in __init__."""
    names = set(vars(cls)) | set(getattr(cls, "__annotations__", {}))
    tree = ast.parse(inspect.getsource(cls))
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []  # fmt: skip
        for t in targets:
            for leaf in ast.walk(t):
                if isinstance(leaf, ast.Attribute) and getattr(leaf.value, "id", "") == "self":
                    names.add(leaf.attr)
    return names


@pytest.mark.parametrize("cls", runtime_classes(), ids=lambda c: c.__name__)
def test_every_runtime_implements_the_runtime_protocol(cls):
    """The trainer calls any runtime through `Runtime` alone: each member, with the protocol's parameters."""
    members = set(Runtime.__annotations__) | {
        name for name, value in vars(Runtime).items() if callable(value) and not name.startswith("_")
    }
    have = attributes_set(cls)
    assert not members - have, f"{cls.__name__} lacks {sorted(members - have)}"
    for name in ("publish", "next_batch", "close"):
        want = list(inspect.signature(getattr(Runtime, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == want, f"{cls.__name__}.{name}"
