"""Run every cell of the grid, two side by side on two cores; finished cells are never run again."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch

from asympo.config import STUDY_VARIANTS, StudyConfig, TrainConfig
from asympo.faults import RunAborted
from asympo.io import atomic_write_text, ensure_writable_dir
from asympo.lifetime import exit_with_parent
from asympo.metrics import console, progress_bar
from asympo.trainer import train


@dataclass(frozen=True)
class Cell:
    objective: str  # the arm, as in the grid: "grpo", "grpo:learner", "grpo@mb4"
    lag: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        arm = self.objective.replace(":", "-").replace("@", "-")
        return f"{arm}-k{self.lag}-lr{self.lr:g}-s{self.seed}"


def cells_of(cfg: StudyConfig) -> list[Cell]:
    """Seed by seed: a study stopped part-way already holds whole grids of the first seeds."""
    return [
        Cell(o, k, lr, s) for s in cfg.seeds for k in cfg.lags for o in cfg.arms for lr in cfg.lrs_for(o, k)
    ]


def cell_config(cfg: StudyConfig, cell: Cell, folder: Path) -> TrainConfig:
    entry, _, minibatches = cell.objective.partition("@mb")
    name, *variants = entry.split(":")
    data = cfg.base.model_dump()
    data["objective"]["name"] = name
    for variant in variants:
        for section, values in STUDY_VARIANTS[variant].items():
            data[section] |= values
    data["runtime"] = {"mode": "lag", "lag": cell.lag}
    data["optim"]["lr"] = cell.lr
    data["optim"]["minibatches"] = int(minibatches or 1)
    data |= {"seed": cell.seed, "out": str(folder), "progress": False}
    return TrainConfig.model_validate(data)


def _run_cell(config_json: str, threads: int) -> dict:
    """In a worker process: one torch thread per core keeps two cells from fighting over both."""
    torch.set_num_threads(threads)
    return train(TrainConfig.model_validate_json(config_json), quiet=True)


def run_grid(cfg: StudyConfig) -> Path:
    out = ensure_writable_dir(cfg.out)
    atomic_write_text(out / "study.json", cfg.model_dump_json(indent=2))
    cells = cells_of(cfg)
    todo = [c for c in cells if not (out / "cells" / c.name / "result.json").exists()]
    if len(todo) < len(cells):
        console.print(
            f"study: {len(cells) - len(todo)} of {len(cells)} cells already done, running {len(todo)}"
        )
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
    with (
        progress_bar(cfg.progress) as bar,
        ProcessPoolExecutor(
            min(cfg.workers, max(len(todo), 1)), mp_context=context, initializer=exit_with_parent
        ) as pool,
    ):
        task = bar.add_task("study", total=len(cells), completed=len(cells) - len(todo), status="")
        running = {}
        for cell in todo:
            config = cell_config(cfg, cell, out / "cells" / cell.name)
            running[pool.submit(_run_cell, config.model_dump_json(), cfg.threads_per_worker)] = cell
        while running:
            bar.update(task, status="running " + " ".join(sorted(c.name for c in running.values()))[:60])
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cell = running.pop(future)
                try:
                    result = future.result()  # a failing cell stops the study; finished cells stay done
                except BrokenProcessPool:
                    raise _died(out, [cell, *running.values()]) from None
                bar.update(task, advance=1)
                console.print(
                    f"  {cell.name}: accuracy {result['accuracy_before']:.1%} -> "
                    f"{result['accuracy_after']:.1%}"
                )
    return out


def _died(out: Path, cells: list[Cell]) -> RunAborted:
    """A worker killed from outside (most often by the kernel, out of memory) takes the pool with it."""
    done = sum(1 for _ in (out / "cells").glob("*/result.json"))
    # A cell may have written its result just before the kill: name only the ones lost.
    lost = [c for c in cells if not (out / "cells" / c.name / "result.json").exists()]
    names = ", ".join(sorted(c.name for c in lost or cells))
    return RunAborted(
        f"a study worker process died while running {names} (killed from outside, most often out of "
        f"memory: fewer workers hold less); the {done} finished cells in {out / 'cells'} are kept: "
        "run the same command again to resume"
    )


def load_cell(folder: Path) -> tuple[dict, list[dict]]:
    result = json.loads((folder / "result.json").read_text())
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return result, steps
