"""Training checkpoints for exact resume: atomic on disk, and loading runs no code (safetensors + JSON).

`root/step-000012/` holds model.safetensors, optimizer.safetensors (optimizer and scheduler tensors),
rng.safetensors, history-{version}.safetensors and state.json (everything else, as JSON). It is written as
`step-000012.tmp/`, fsynced, renamed, and only then named in `root/latest`, so a SIGKILL at any instant
leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from asympo.errors import UserError
from asympo.io import atomic_write_text
from asympo.models.lora import plain_state
from asympo.models.tying import tied_aliases

STEP_DIR = re.compile(r"step-(\d+)")
LATEST_NAME = re.compile(r"step-\d+(\.old)?")
History = list[tuple[int, dict[str, torch.Tensor]]]


@dataclass
class TrainState:
    step: int  # optimiser steps completed (the next step to run)
    version: int  # learner policy version
    skipped_steps: int
    cursor: int  # data cursor: train problems consumed so far
    counters: dict[str, float] = field(default_factory=dict)  # fault counters etc., JSON-able


def _fsync(path: Path) -> None:
    """Works for files and folders: a rename is only durable once the parent folder is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copies(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Private contiguous CPU copies: safetensors refuses shared storage such as tied embeddings."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a state dict; tensors go to `tensors` under dotted keys (`state.0.exp_avg`)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, tuple | list):
        items = [_flatten(v, f"{key}.{i}".lstrip("."), tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):  # as pairs, so int keys (optimizer param ids) stay ints
        return {"__items__": [[k, _flatten(v, f"{key}.{k}".lstrip("."), tensors)] for k, v in obj.items()]}
    return obj


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
    return obj


def _read_latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def save_checkpoint(
    root: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: Sequence[tuple[int, dict[str, torch.Tensor]]] = (),
    keep: int = 2,
    shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint for `state.step`, point `latest` at it, then prune old ones. With
    `shards` (the data-parallel learner) the model and optimiser are written by every rank into `shards/`
    instead of model.safetensors and the optimizer's tensors."""
    versions = [v for v, _ in history]
    if keep < 1 or len(set(versions)) != len(versions):
        raise ValueError(f"need keep >= 1 and distinct history versions, got keep={keep}, {versions}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    extra: dict[str, torch.Tensor] = {}
    np_state = np.random.get_state()
    meta = {
        "train": asdict(state),
        "optimizer": None if shards else _flatten(optimizer.state_dict(), "", extra),
        "scheduler": _flatten(scheduler.state_dict(), "scheduler", extra),
        "python_rng": random.getstate(),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "history": versions,
    }
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    if shards is not None:
        shards(tmp / "shards")
        meta |= {"shards": True, "processes": torch.distributed.get_world_size()}
    files = {} if shards else {"model.safetensors": _copies(_trained(model)[0])}
    files["optimizer.safetensors"] = extra
    files |= {"rng.safetensors": rng} | {f"history-{v}.safetensors": _copies(sd) for v, sd in history}
    for name, tensors in files.items():
        save_file(tensors, tmp / name)
        _fsync(tmp / name)
    (tmp / "state.json").write_text(json.dumps(meta))
    _fsync(tmp / "state.json")
    _fsync(tmp)
    if final.exists():
        if _read_latest(root) == final.name:  # same step saved twice: name a hard-linked copy meanwhile
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(final, old, copy_function=os.link)
            _fsync(old)
            _fsync(root)
            atomic_write_text(root / "latest", old.name + "\n")
        shutil.rmtree(final)  # otherwise an orphan of a crash between rename and `latest`
    os.replace(tmp, final)
    _fsync(root)
    atomic_write_text(root / "latest", final.name + "\n")
    _fsync(root)
    _prune(root, state.step, keep)
    return final


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`; later ones are orphans of an abandoned timeline."""
    numbered = {p: int(m[1]) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()}
    kept = sorted((p for p, n in numbered.items() if n <= step), key=numbered.__getitem__)[-keep:]
    for p in root.iterdir():
        if p.is_dir() and p not in kept and (p in numbered or p.suffix in (".tmp", ".old")):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete folder `latest` names, or None before the first save."""
    name = _read_latest(root)
    if name is None:
        return None
    if not LATEST_NAME.fullmatch(name):
        raise UserError(f"checkpoint pointer {root / 'latest'} is corrupt: {name[:40]!r} is not a checkpoint")
    return root / name


@contextmanager
def _corrupt(folder: Path, what: str) -> Iterator[None]:
    """Turn any read or parse failure into a one-line UserError naming the folder and the file."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} is corrupt: {what}: missing") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise UserError(f"checkpoint {folder} is corrupt: {what}: {reason}") from None


def _trained(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What model.safetensors holds and what the history's published weights are named after: the whole
    state dict for both, or under LoRA the adapters (the base is frozen: it reloads from the model setting)
    and the plain names of the merged weights."""
    if hasattr(model, "peft_config"):
        return {k: p for k, p in model.named_parameters() if p.requires_grad}, plain_state(model)
    state = model.state_dict()
    return state, state


def _check_shapes(weights: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Compare names and shapes before touching the model, so a mismatch leaves it as it was."""
    optional = tied_aliases(want)  # published weights (the lag history) leave the tied alias out
    if not (want.keys() - optional) <= weights.keys() <= want.keys():
        missing = sorted(want.keys() - optional - weights.keys())
        unexpected = sorted(weights.keys() - want.keys())
        raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in weights.items():
        if v.shape != want[k].shape:
            raise ValueError(f"{k} has shape {tuple(v.shape)}, the model expects {tuple(want[k].shape)}")
    return weights


def load_checkpoint(
    root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    shards: Callable[[Path], None] | None = None,
) -> tuple[TrainState, History] | None:
    """Restore what `save_checkpoint` wrote (model, optimiser, scheduler, RNGs); None if there is none yet.
    A checkpoint of the data-parallel learner needs `shards` (every rank reads its own)."""
    folder = latest_checkpoint(root)
    if folder is None:
        return None
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} is corrupt: the folder is missing")
    with _corrupt(folder, "state.json"):
        meta = json.loads((folder / "state.json").read_text())
        state = TrainState(**meta["train"])
        sharded = bool(meta.get("shards"))
        names = ["optimizer", "rng"] + [f"history-{v}" for v in meta["history"]]
        names = names if sharded else ["model", *names]
    if sharded != (shards is not None):
        written = f"by {meta.get('processes')} learner processes" if sharded else "by one learner process"
        raise UserError(f"checkpoint {folder} was written {written}: resume with the same learner.processes")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    trained, published = _trained(model)
    for name in names:
        with _corrupt(folder, f"{name}.safetensors"):
            tensors[name] = load_file(folder / f"{name}.safetensors")
            if name == "model" or name.startswith("history-"):
                _check_shapes(tensors[name], trained if name == "model" else published)
    if shards is not None:
        with _corrupt(folder, "shards"):
            shards(folder / "shards")
    with _corrupt(folder, "state.json"):
        if shards is None:
            model.load_state_dict(tensors["model"], strict=trained is published)  # LoRA: the adapters only
            optimizer.load_state_dict(unflatten(meta["optimizer"], tensors["optimizer"]))
        scheduler.load_state_dict(unflatten(meta["scheduler"], tensors["optimizer"]))
        torch.set_rng_state(tensors["rng"]["torch"])
        cuda = [tensors["rng"][f"cuda.{i}"] for i in range(len(tensors["rng"]) - 1)]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        version, py_state, gauss = meta["python_rng"]
        random.setstate((version, tuple(py_state), gauss))
        kind, keys, *rest = meta["numpy_rng"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return state, [(v, tensors[f"history-{v}"]) for v in meta["history"]]
