"""`asympo study` end to end: a two-cell, few-step grid through the CLI, its files, and that every table
number is a recomputation from the cells' own metrics files; a second run resumes without rerunning."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys

import pytest

from asympo.config import StudyConfig, build_config
from asympo.errors import UserError

GRID = [
    "objectives=[pg,asympo]",
    "lags=[1]",
    "seeds=[0]",
    "base.steps=4",
    "base.eval_every=2",
    "base.rollout.prompts_per_step=4",
    "base.rollout.group_size=4",
    "base.eval_samples=1",
    "base.task.test_size=20",
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


def test_study_writes_table_csv_and_plots(study_out):
    for name in ["results.md", "results.csv", "cells.csv", "study.json"]:
        assert (study_out / name).stat().st_size > 0, name
    for name in ["accuracy.png", "reward.png", "nll_ratio.png", "loss_split.png"]:
        assert (study_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ["pg-k1-s0", "asympo-k1-s0"]:
        cfg = json.loads((study_out / "cells" / name / "config.json").read_text())
        assert (cfg["runtime"]["mode"], cfg["runtime"]["lag"]) == ("lag", 1)
        assert cfg["steps"] == 4 and cfg["seed"] == 0
        assert cfg["objective"]["name"] == name.split("-")[0]
        assert cfg["eval_samples"] == 1  # the study's base overrides reach each cell
        assert not (study_out / "cells" / name / "final").exists()  # study cells keep no model


def test_every_table_number_comes_from_the_cells_metrics(study_out):
    rows = {r["objective"]: r for r in _read_csv(study_out / "results.csv")}
    assert set(rows) == {"pg", "asympo"}
    markdown = (study_out / "results.md").read_text()
    for objective, row in rows.items():
        result, steps = _cell(study_out, f"{objective}-k1-s0")
        trained = [m for m in steps if "reward" in m]
        assert len(trained) == 4
        evals = [m["test_accuracy"] for m in trained if "test_accuracy" in m]
        best = max([result["accuracy_before"], *evals, result["accuracy_after"]])
        ratio = statistics.fmean(m["nll_ratio"] for m in trained if m.get("nll_ratio") is not None)
        assert float(row["final_mean"]) == pytest.approx(result["accuracy_after"])
        assert float(row["best_mean"]) == pytest.approx(best)
        assert float(row["nll_ratio_mean"]) == pytest.approx(ratio)
        collapsed = result["accuracy_after"] < 0.5 * result["accuracy_before"]
        assert int(row["collapsed"]) == int(collapsed)
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {objective} | 1 |"))
        assert f"{result['accuracy_after']:.3f} ± 0.000" in line
        assert f"{ratio:.3f}" in line


def test_rerun_resumes_finished_cells_and_runs_only_new_ones(study_out):
    before = {p: p.stat().st_mtime_ns for p in (study_out / "cells").glob("*/result.json")}
    result = study(study_out, "objectives=[pg,asympo,spo]")
    assert result.returncode == 0, result.stderr
    assert "2 of 3 cells already done, running 1" in result.stdout + result.stderr
    after = {p: p.stat().st_mtime_ns for p in (study_out / "cells").glob("*/result.json")}
    assert {p: after[p] for p in before} == before  # finished cells were not run again
    assert len(after) == 3
    assert {r["objective"] for r in _read_csv(study_out / "results.csv")} == {"pg", "asympo", "spo"}


def test_study_config_keeps_base_defaults_and_rejects_bad_grids():
    cfg = build_config(StudyConfig, None, ["base.steps=10"])
    assert cfg.base.steps == 10 and cfg.base.eval_samples == 4 and not cfg.base.save_model
    with pytest.raises(UserError, match="unknown objective 'nope'"):
        build_config(StudyConfig, None, ["objectives=[pg,nope]"])
    with pytest.raises(UserError, match="lags"):
        build_config(StudyConfig, None, ["lags=[-1]"])
    assert build_config(StudyConfig, None, ["objectives=[grpo:learner]"]).objectives == ["grpo:learner"]
