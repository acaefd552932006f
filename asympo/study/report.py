"""The study's numbers, all read back from the cells' own metrics files: nothing is typed in by hand."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from asympo.config import StudyConfig
from asympo.study.grid import Cell, cells_of, load_cell


def accuracy_curve(result: dict, steps: list[dict]) -> list[tuple[int, float]]:
    """Held-out accuracy by optimiser step: before training, every eval_every steps, and after."""
    curve = [(0, result["accuracy_before"])]
    curve += [(m["step"] + 1, m["test_accuracy"]) for m in steps if "test_accuracy" in m and "reward" in m]
    return curve + [(result["steps"], result["accuracy_after"])]


def cell_summary(cfg: StudyConfig, cell: Cell, result: dict, steps: list[dict]) -> dict:
    ratios = [m["nll_ratio"] for m in steps if m.get("nll_ratio") is not None]
    return {
        "objective": cell.objective,
        "k": cell.lag,
        "seed": cell.seed,
        "initial_accuracy": result["accuracy_before"],
        "final_accuracy": result["accuracy_after"],
        "best_accuracy": max(acc for _, acc in accuracy_curve(result, steps)),
        "collapsed": result["accuracy_after"] < cfg.collapse_drop * result["accuracy_before"],
        "nll_ratio_mean": statistics.fmean(ratios) if ratios else float("nan"),
    }


def summarise(cfg: StudyConfig, out: Path) -> tuple[list[dict], list[dict]]:
    """Per-cell rows, and one row per (objective, k) with mean and std over seeds."""
    cells = [cell_summary(cfg, c, *load_cell(out / "cells" / c.name)) for c in cells_of(cfg)]
    table = []
    for k in cfg.lags:
        for objective in cfg.objectives:
            rows = [r for r in cells if r["objective"] == objective and r["k"] == k]
            final = [r["final_accuracy"] for r in rows]
            table.append(
                {
                    "objective": objective,
                    "k": k,
                    "seeds": len(rows),
                    "final_mean": statistics.fmean(final),
                    "final_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                    "best_mean": statistics.fmean(r["best_accuracy"] for r in rows),
                    "collapsed": sum(r["collapsed"] for r in rows),
                    "nll_ratio_mean": statistics.fmean(r["nll_ratio_mean"] for r in rows),
                }
            )
    return cells, table


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(table: list[dict], cfg: StudyConfig) -> str:
    lines = [
        "| objective | k | final accuracy (mean ± std) | best accuracy | collapsed | NLL+/NLL- |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['objective']} | {r['k']} | {r['final_mean']:.3f} ± {r['final_std']:.3f} "
            f"| {r['best_mean']:.3f} "
            f"| {r['collapsed']}/{r['seeds']} | {r['nll_ratio_mean']:.3f} |"
        )
    note = (
        f"\nHeld-out sampled pass@1 ({cfg.base.eval_samples} samples per problem, {cfg.base.task.test_size} "
        f"problems) after {cfg.base.steps} steps. Collapsed: final accuracy below "
        f"{cfg.collapse_drop:g} x the "
        "initial accuracy. NLL+/NLL-: mean over steps of the positive/negative mean-NLL ratio.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_report(cfg: StudyConfig, out: Path) -> list[dict]:
    cells, table = summarise(cfg, out)
    write_csv(out / "cells.csv", cells)
    write_csv(out / "results.csv", table)
    (out / "results.md").write_text(markdown_table(table, cfg))
    return table
