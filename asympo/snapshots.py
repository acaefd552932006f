"""Weights of recent policy versions, kept off the hot path so the learner can recompute behaviour log-probs.

Only the last `keep` versions are held (`keep` = max_staleness + 1): a sample older than that is not
admissible anyway, so nothing a buffered sample can need is ever evicted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

Weights = dict[str, torch.Tensor]


class SnapshotStore:
    def __init__(self, keep: int, where: Literal["memory", "disk"] = "memory", folder: Path | None = None):
        if keep < 1:
            raise ValueError("a snapshot store must keep at least one version")
        if where == "disk" and folder is None:
            raise ValueError("a disk snapshot store needs a folder")
        self.keep, self.where, self.folder = keep, where, folder
        self._memory: dict[int, Weights] = {}
        self._versions: list[int] = []
        self.evicted = 0
        if folder is not None and where == "disk":
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def versions(self) -> list[int]:
        return list(self._versions)

    def _path(self, version: int) -> Path:
        return self.folder / f"v{version}.safetensors"

    def put(self, version: int, weights: Weights) -> None:
        """Store (or replace: a skipped step republishes its version) and evict what is now too old."""
        if self.where == "memory":
            self._memory[version] = weights
        else:
            tmp = self._path(version).with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
            tmp.replace(self._path(version))
        if version not in self._versions:
            self._versions.append(version)
        self._versions.sort()
        while len(self._versions) > self.keep:
            self._drop(self._versions.pop(0))

    def _drop(self, version: int) -> None:
        self.evicted += 1
        if self.where == "memory":
            del self._memory[version]
        else:
            self._path(version).unlink(missing_ok=True)

    def get(self, version: int) -> Weights | None:
        if version not in self._versions:
            return None
        return self._memory[version] if self.where == "memory" else load_file(str(self._path(version)))
