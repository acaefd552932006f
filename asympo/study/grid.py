"""Run every cell of the grid, two side by side on two cores; finished cells are never run again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from asympo.config import STUDY_VARIANTS, StudyConfig, TrainConfig
from asympo.faults import RunAborted
from asympo.io import atomic_write_text, ensure_writable_dir
from asympo.lifetime import child_env
from asympo.metrics import console, progress_bar

POLL = 0.2  # seconds between two looks at the running cells


@dataclass(frozen=True)
class Cell:
    objective: str  # the arm, as in the grid: "grpo", "grpo:learner", "grpo@mb4"
    lag: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        arm = self.objective.replace(":", "-").replace("@", "-").replace("~", "-")
        return f"{arm}-k{self.lag}-lr{self.lr:g}-s{self.seed}"


def cells_of(cfg: StudyConfig) -> list[Cell]:
    """Seed by seed: a study stopped part-way already holds whole grids of the first seeds."""
    return [
        Cell(o, k, lr, s) for s in cfg.seeds for k in cfg.lags for o in cfg.arms for lr in cfg.lrs_for(o, k)
    ]


def cell_config(cfg: StudyConfig, cell: Cell, folder: Path) -> TrainConfig:
    arm, _, minibatches = cell.objective.partition("@mb")
    entry, _, updates = arm.partition("~")
    name, *variants = entry.split(":")
    data = cfg.base.model_dump()
    data["objective"]["name"] = name
    for variant in variants:
        for section, values in STUDY_VARIANTS[variant].items():
            data[section] |= values
    data["runtime"] = {"mode": "lag", "lag": cell.lag}
    if updates in ("lag", "lag-switch"):  # lag k, the newest version loaded mid-batch or not
        data["runtime"] |= {"lag_switch_at": cfg.lag_switch_at if updates == "lag-switch" else 0}
    elif updates:  # the async runtime, its staleness bounded by k; weights between jobs or in flight
        data["runtime"] = {"mode": "async", "max_staleness": cell.lag}
        when, _, kv = updates.partition("-")
        data["rollout"] |= {"weight_updates": when} | ({"inflight_kv": kv} if kv else {})
    data["optim"]["lr"] = cell.lr
    data["optim"]["minibatches"] = int(minibatches or 1)
    data |= {"seed": cell.seed, "out": str(folder), "progress": False}
    return TrainConfig.model_validate(data)


def _start_cell(config: TrainConfig, threads: int) -> subprocess.Popen:
    """A cell is `asympo train` in a process of its own, reading the config it is given from its folder; one
    torch thread per core keeps two cells from fighting over both. It ends with the study (asympo.lifetime),
    and its output goes to `train.log` there."""
    folder = ensure_writable_dir(config.out)
    atomic_write_text(folder / "cell.json", config.model_dump_json(indent=2))  # JSON is YAML
    log = (folder / "train.log").open("w")
    env = child_env() | {"OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "asympo", "train", "--config", str(folder / "cell.json")]
    try:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    finally:
        log.close()  # the child holds its own copy


def run_grid(cfg: StudyConfig) -> Path:
    out = ensure_writable_dir(cfg.out)
    atomic_write_text(out / "study.json", cfg.model_dump_json(indent=2))
    cells = cells_of(cfg)
    todo = [c for c in cells if not (out / "cells" / c.name / "result.json").exists()]
    if len(todo) < len(cells):
        console.print(
            f"study: {len(cells) - len(todo)} of {len(cells)} cells already done, running {len(todo)}"
        )
    running: dict[Cell, subprocess.Popen] = {}
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("study", total=len(cells), completed=len(cells) - len(todo), status="")
        try:
            while todo or running:
                while todo and len(running) < cfg.workers:
                    cell = todo.pop(0)
                    config = cell_config(cfg, cell, out / "cells" / cell.name)
                    running[cell] = _start_cell(config, cfg.threads_per_worker)
                bar.update(task, status="running " + " ".join(sorted(c.name for c in running))[:60])
                finished = [cell for cell, process in running.items() if process.poll() is not None]
                if not finished:
                    time.sleep(POLL)
                for cell in finished:
                    process = running.pop(cell)
                    folder = out / "cells" / cell.name
                    if process.returncode < 0:  # a signal from outside, most often the kernel's OOM killer
                        raise _died(out, [cell, *running])
                    if process.returncode:  # a failing cell stops the study; finished cells stay done
                        raise RunAborted(f"cell {cell.name} failed: {_last_line(folder / 'train.log')}")
                    result = json.loads((folder / "result.json").read_text())
                    bar.update(task, advance=1)
                    console.print(
                        f"  {cell.name}: accuracy {result['accuracy_before']:.1%} -> "
                        f"{result['accuracy_after']:.1%}"
                    )
        finally:
            for process in running.values():  # stopped early: each cell checkpoints and leaves
                process.terminate()
            for process in running.values():
                process.wait()
    return out


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "no output"


def _died(out: Path, cells: list[Cell]) -> RunAborted:
    """A cell killed from outside (most often by the kernel, out of memory) stops the study."""
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
