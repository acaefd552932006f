"""`asympo study` end to end: a four-cell, few-step grid (two objectives x two lrs) through the CLI, its
files, that every table number is a recomputation from the cells' own metrics files, that the lr is chosen
on the validation set; a second run resumes without rerunning."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

GRID = [
    "objectives=[pg,asympo:group]",
    "lags=[1]",
    "lrs=[1e-4,3e-4]",
    "seeds=[0]",
    "base.steps=4",
    "base.eval_every=2",
    "base.rollout.prompts_per_step=4",
    "base.rollout.group_size=4",
    "base.eval_samples=1",
    "base.task.test_size=20",
    "base.task.validation_size=20",
    "workers=2",
    "progress=false",
]


def study(out, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "asympo", "study", *GRID, f"out={out}", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    result = study(out)
    assert result.returncode == 0, result.stderr
    return out


def _read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def _cell(out, name):
    folder = out / "cells" / name
    result = json.loads((folder / "result.json").read_text())
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return result, steps


CELLS = [f"{o}-k1-lr{lr}-s0" for o in ("pg", "asympo-group") for lr in ("0.0001", "0.0003")]


def test_study_writes_table_csv_and_plots(study_out):
    for name in ["results.md", "results.csv", "tuned.csv", "cells.csv", "study.json"]:
        assert (study_out / name).stat().st_size > 0, name
    plots = ["accuracy", "reward", "nll_ratio", "grad_norm", "entropy", "loss_split", "final", "lr"]
    for name in [f"{plot}.png" for plot in plots]:
        assert (study_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in CELLS:
        cfg = json.loads((study_out / "cells" / name / "config.json").read_text())
        assert (cfg["runtime"]["mode"], cfg["runtime"]["lag"]) == ("lag", 1)
        assert cfg["steps"] == 4 and cfg["seed"] == 0
        assert cfg["objective"]["name"] == name.split("-")[0]
        assert cfg["objective"]["asympo_scale"] == ("group" if "group" in name else "none")  # the variant
        assert cfg["optim"]["lr"] == float(name.split("-lr")[1].split("-s")[0])
        assert cfg["eval_samples"] == 1  # the study's base overrides reach each cell
        assert not (study_out / "cells" / name / "final").exists()  # study cells keep no model


def test_every_table_number_comes_from_the_cells_metrics(study_out):
    rows = {(r["objective"], float(r["lr"])): r for r in _read_csv(study_out / "results.csv")}
    assert set(rows) == {(o, lr) for o in ("pg", "asympo:group") for lr in (1e-4, 3e-4)}
    markdown = (study_out / "results.md").read_text()
    for (objective, lr), row in rows.items():
        result, steps = _cell(study_out, f"{objective.replace(':', '-')}-k1-lr{lr:g}-s0")
        trained = [m for m in steps if "reward" in m]
        assert len(trained) == 4
        evals = [m["test_accuracy"] for m in trained if "test_accuracy" in m]
        best = max([result["accuracy_before"], *evals, result["accuracy_after"]])
        ratio = statistics.fmean(m["nll_ratio"] for m in trained if m.get("nll_ratio") is not None)
        assert float(row["final_mean"]) == pytest.approx(result["accuracy_after"])
        assert float(row["validation_mean"]) == pytest.approx(result["validation_accuracy_after"])
        assert float(row["best_mean"]) == pytest.approx(best)
        assert float(row["nll_ratio_mean"]) == pytest.approx(ratio)
        grad_norm = statistics.fmean(m["grad_norm"] for m in trained)
        assert float(row["grad_norm_mean"]) == pytest.approx(grad_norm)
        collapsed = result["accuracy_after"] < 0.5 * result["accuracy_before"]
        assert int(row["collapsed"]) == int(collapsed)
        start = f"| {objective} | 1 | {lr:g} |"
        line = next(line for line in markdown.splitlines() if line.startswith(start))
        assert f"{result['accuracy_after']:.3f} ± 0.000" in line
        assert f"{ratio:.3f}" in line


def test_the_lr_is_chosen_on_validation_never_on_test(study_out):
    tuned = {r["objective"]: r for r in _read_csv(study_out / "tuned.csv")}
    for objective in ("pg", "asympo:group"):
        name = objective.replace(":", "-")
        results = {lr: _cell(study_out, f"{name}-k1-lr{lr:g}-s0")[0] for lr in (1e-4, 3e-4)}
        validation = {lr: r["validation_accuracy_after"] for lr, r in results.items()}
        expected = max(sorted(validation), key=validation.get)  # ties: the smaller lr
        row = tuned[objective]
        assert float(row["chosen_lr"]) == expected
        assert float(row["chosen_final_mean"]) == pytest.approx(results[expected]["accuracy_after"])
        assert float(row["default_lr_final_mean"]) == pytest.approx(results[1e-4]["accuracy_after"])


def test_rerun_resumes_finished_cells_and_runs_only_new_ones(study_out):
    """A minibatches axis added later: the finished one-update cells stay, the two-update arms run."""
    before = {p: p.stat().st_mtime_ns for p in (study_out / "cells").glob("*/result.json")}
    result = study(study_out, "minibatches=[1,2]", "lrs=[1e-4]")
    assert result.returncode == 0, result.stderr
    assert "2 of 4 cells already done, running 2" in result.stdout + result.stderr
    after = {p: p.stat().st_mtime_ns for p in (study_out / "cells").glob("*/result.json")}
    assert {p: after[p] for p in before} == before  # finished cells were not run again
    assert len(after) == 6
    arms = {r["objective"] for r in _read_csv(study_out / "results.csv")}
    assert arms == {"pg", "asympo:group", "pg@mb2", "asympo:group@mb2"}
    config = json.loads((study_out / "cells" / "pg-mb2-k1-lr0.0001-s0" / "config.json").read_text())
    assert config["optim"]["minibatches"] == 2
    cell, _ = _cell(study_out, "pg-mb2-k1-lr0.0001-s0")
    assert cell["version"] == 8  # 4 batches of 2 updates


def test_lr_table_runs_one_chosen_lr_per_arm_and_k(study_out):
    """An lr chosen elsewhere: pg runs only at its table lr (one new cell), asympo:group at every lr."""
    result = study(study_out, "lrs=[1e-4]", "lr_table={pg: {0: 0.0002}}")
    assert result.returncode == 0, result.stderr
    assert "1 of 2 cells already done, running 1" in result.stdout + result.stderr
    config = json.loads((study_out / "cells" / "pg-k1-lr0.0002-s0" / "config.json").read_text())
    assert config["optim"]["lr"] == 0.0002
    rows = {(r["objective"], float(r["lr"])) for r in _read_csv(study_out / "results.csv")}
    assert rows == {("pg", 2e-4), ("asympo:group", 1e-4)}


def _workers_of(pid: int) -> list[int]:
    """The study's cell processes: its `asympo train` children."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"asympo\0train" in cmdline:
            found.append(int(proc.name))
    return found


def test_a_killed_worker_stops_the_study_with_one_line_and_keeps_finished_cells(tmp_path):
    """As the kernel's OOM killer does: SIGKILL the worker while it runs the second cell."""
    out = tmp_path / "s"
    args = [sys.executable, "-m", "asympo", "study", *GRID, f"out={out}"]
    args += ["objectives=[pg]", "lrs=[1e-4]", "seeds=[0,1]", "workers=1", "base.eval_every=0"]
    study = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "cells" / "pg-k1-lr0.0001-s0" / "result.json"
    second = out / "cells" / "pg-k1-lr0.0001-s1" / "metrics.jsonl"  # the worker has moved on to it
    deadline = time.monotonic() + 600
    while not second.exists() and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _workers_of(study.pid)
    assert first.exists() and workers, "the second cell should start with the worker still alive"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = study.communicate(timeout=120)
    assert study.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    message = stderr.strip().splitlines()[-1]  # after the finished cell's progress line
    assert message.startswith(
        "asympo: run stopped: a study worker process died while running pg-k1-lr0.0001-s1 "
    )
    assert "the 1 finished cells" in message and "run the same command again" in message
    assert first.exists() and not (out / "cells" / "pg-k1-lr0.0001-s1" / "result.json").exists()
