"""The study's numbers, all read back from the cells' own metrics files: nothing is typed in by hand.

The learning rate of each (objective, k) is chosen on the validation set, never on the test set: the lr
with the highest mean final validation accuracy over seeds (ties go to the smaller lr). Final accuracy is
what the table reports, so it is also what the choice optimises; per k, because how large a step an
objective tolerates changes with staleness.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

from asympo.config import StudyConfig
from asympo.study.grid import Cell, cells_of, load_cell

NAN = float("nan")


def accuracy_curve(result: dict, steps: list[dict]) -> list[tuple[int, float]]:
    """Held-out accuracy by optimiser step: before training, every eval_every steps, and after."""
    curve = [(0, result["accuracy_before"])]
    curve += [(m["step"] + 1, m["test_accuracy"]) for m in steps if "test_accuracy" in m and "reward" in m]
    return curve + [(result["steps"], result["accuracy_after"])]


def _mean_of(steps: list[dict], key: str) -> float:
    values = [m[key] for m in steps if m.get(key) is not None and "reward" in m]
    return statistics.fmean(values) if values else NAN


def accuracy_at(result: dict, steps: list[dict], seconds: float) -> float:
    """Held-out accuracy of the last evaluation logged within `seconds` of the run's start (wall time, the
    evaluations included: every arm runs the same ones)."""
    timed = [(0.0, result["accuracy_before"])]
    timed += [(m["elapsed"], m["test_accuracy"]) for m in steps if "test_accuracy" in m and "elapsed" in m]
    timed.append((result["seconds"], result["accuracy_after"]))
    return [acc for t, acc in sorted(timed) if t <= seconds][-1]


def cell_summary(cfg: StudyConfig, cell: Cell, result: dict, steps: list[dict]) -> dict:
    trained = [m for m in steps if "reward" in m and "elapsed" in m]
    return {
        "objective": cell.objective,
        "k": cell.lag,
        "lr": cell.lr,
        "seed": cell.seed,
        "initial_accuracy": result["accuracy_before"],
        "final_accuracy": result["accuracy_after"],
        "validation_accuracy": result.get("validation_accuracy_after", NAN),
        "best_accuracy": max(acc for _, acc in accuracy_curve(result, steps)),
        "collapsed": result["accuracy_after"] < cfg.collapse_drop * result["accuracy_before"],
        "nll_ratio_mean": _mean_of(steps, "nll_ratio"),
        "grad_norm_mean": _mean_of(steps, "grad_norm"),
        "scale_mean": _mean_of(steps, "asympo_scale_mean"),
        "pos_share_mean": _mean_of(steps, "asympo_pos_share"),
        "train_seconds": result.get("seconds", trained[-1]["elapsed"] if trained else NAN),
        "spanning_frac": _mean_of(steps, "spanning_frac"),
        "staleness_mean": _mean_of(steps, "staleness_mean"),
        "staleness_inflight_mean": _mean_of(steps, "staleness_inflight_mean"),
        "staleness_queue_mean": _mean_of(steps, "staleness_queue_mean"),
        "publish_latency_p50": _median_of(steps, "publish_latency_p50"),
    }


def _median_of(steps: list[dict], key: str) -> float:
    values = [m[key] for m in steps if m.get(key) is not None and m[key] == m[key] and "reward" in m]
    return statistics.median(values) if values else NAN


def wall_time_table(cfg: StudyConfig, out: Path) -> str:
    """For async studies: each arm's final accuracy at equal steps, and at equal wall time (the shortest
    arm's mean training time, reading each cell's last evaluation by then)."""
    rows = []
    for k in cfg.lags:
        by_arm = {}
        for arm in cfg.arms:
            cells = [c for c in cells_of(cfg) if (c.objective, c.lag) == (arm, k)]
            loaded = [load_cell(out / "cells" / c.name) for c in cells]
            summaries = [cell_summary(cfg, c, *x) for c, x in zip(cells, loaded, strict=True)]
            by_arm[arm] = (loaded, summaries)
        budget = min(_mean([s["train_seconds"] for s in summaries]) for _, summaries in by_arm.values())
        for arm, (loaded, summaries) in by_arm.items():
            seconds = " / ".join(f"{s['train_seconds']:.0f}" for s in summaries)
            rows.append(
                f"| {arm} | {k} | {_mean([s['final_accuracy'] for s in summaries]):.3f} "
                f"| {_mean([accuracy_at(r, st, budget) for r, st in loaded]):.3f} "
                f"| {seconds} "
                f"| {_mean([s['staleness_mean'] for s in summaries]):.2f} "
                f"| {_mean([s['staleness_inflight_mean'] for s in summaries]):.3f} "
                f"| {_mean([s['staleness_queue_mean'] for s in summaries]):.3f} "
                f"| {_mean([s['spanning_frac'] for s in summaries]):.1%} "
                f"| {_number(_mean([s['publish_latency_p50'] for s in summaries]))} | {len(summaries)} |"
            )
        rows.append(f"|  | {k} | equal wall time: {budget:.0f} s |  |  |  |  |  |  |  |  |")
    head = [
        "| arm | k | final accuracy (equal steps) | accuracy at equal wall time | seconds per seed "
        "| staleness | in flight | queued | spanning | publish-to-use p50 s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else NAN


def summarise(cfg: StudyConfig, out: Path) -> tuple[list[dict], list[dict]]:
    """Per-cell rows, and one row per (objective, k, lr) with mean and std over seeds."""
    cells = [cell_summary(cfg, c, *load_cell(out / "cells" / c.name)) for c in cells_of(cfg)]
    table = []
    for k in cfg.lags:
        for objective in cfg.arms:
            for lr in cfg.lrs_for(objective, k):
                rows = [r for r in cells if (r["objective"], r["k"], r["lr"]) == (objective, k, lr)]
                final = [r["final_accuracy"] for r in rows]
                table.append(
                    {
                        "objective": objective,
                        "k": k,
                        "lr": lr,
                        "seeds": len(rows),
                        "final_mean": _mean(final),
                        "final_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                        "validation_mean": _mean([r["validation_accuracy"] for r in rows]),
                        "best_mean": _mean([r["best_accuracy"] for r in rows]),
                        "collapsed": sum(r["collapsed"] for r in rows),
                        **{key: _mean([r[key] for r in rows]) for key in MEANS},
                    }
                )
    return cells, table


MEANS = ["nll_ratio_mean", "grad_norm_mean", "scale_mean", "pos_share_mean"]


def chosen_lrs(table: list[dict]) -> dict[tuple[str, int], float]:
    """(objective, k) -> the lr with the best mean validation accuracy; empty without a validation set."""
    if any(math.isnan(r["validation_mean"]) for r in table):
        return {}
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in sorted(table, key=lambda r: r["lr"]):  # max() keeps the first best: the smaller lr
        groups[(row["objective"], row["k"])].append(row)
    return {key: max(rows, key=lambda r: r["validation_mean"])["lr"] for key, rows in groups.items()}


def tuned_rows(cfg: StudyConfig, table: list[dict]) -> list[dict]:
    """One row per (objective, k): the default lr's test accuracy beside the validation-chosen lr's."""
    chosen, default_lr = chosen_lrs(table), cfg.base.optim.lr
    by_key = {(r["objective"], r["k"], r["lr"]): r for r in table}
    rows = []
    for k in cfg.lags:
        for objective in cfg.arms:
            default = by_key.get((objective, k, default_lr))
            lr = chosen.get((objective, k))
            pick = by_key.get((objective, k, lr)) if lr is not None else None
            rows.append(
                {
                    "objective": objective,
                    "k": k,
                    "default_lr_final_mean": default["final_mean"] if default else NAN,
                    "default_lr_final_std": default["final_std"] if default else NAN,
                    "chosen_lr": lr if lr is not None else NAN,
                    "chosen_validation_mean": pick["validation_mean"] if pick else NAN,
                    "chosen_final_mean": pick["final_mean"] if pick else NAN,
                    "chosen_final_std": pick["final_std"] if pick else NAN,
                    "chosen_best_mean": pick["best_mean"] if pick else NAN,
                    "chosen_collapsed": pick["collapsed"] if pick else 0,
                    "seeds": pick["seeds"] if pick else (default["seeds"] if default else 0),
                    "chosen_nll_ratio_mean": pick["nll_ratio_mean"] if pick else NAN,
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _pm(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def tuned_table(rows: list[dict], cfg: StudyConfig) -> str:
    lines = [
        f"| objective | k | final at lr {cfg.base.optim.lr:g} | chosen lr | validation | final at chosen lr "
        "| best | collapsed | NLL+/NLL- |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = "-" if math.isnan(r["chosen_lr"]) else f"{r['chosen_lr']:g}"
        lines.append(
            f"| {r['objective']} | {r['k']} | {_pm(r['default_lr_final_mean'], r['default_lr_final_std'])} "
            f"| {chosen} | {r['chosen_validation_mean']:.3f} "
            f"| {_pm(r['chosen_final_mean'], r['chosen_final_std'])} | {r['chosen_best_mean']:.3f} "
            f"| {r['chosen_collapsed']}/{r['seeds']} | {r['chosen_nll_ratio_mean']:.3f} |"
        )
    return "\n".join(lines)


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def full_table(table: list[dict]) -> str:
    lines = [
        "| objective | k | lr | final accuracy (mean ± std) | validation | best accuracy | collapsed "
        "| NLL+/NLL- | grad norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['objective']} | {r['k']} | {r['lr']:g} | {_pm(r['final_mean'], r['final_std'])} "
            f"| {_number(r['validation_mean'])} | {r['best_mean']:.3f} | {r['collapsed']}/{r['seeds']} "
            f"| {r['nll_ratio_mean']:.3f} | {r['grad_norm_mean']:.3f} |"
        )
    return "\n".join(lines)


def markdown_report(cfg: StudyConfig, table: list[dict], tuned: list[dict], out: Path) -> str:
    task = cfg.base.task
    chosen = (
        f"Chosen lr: the best mean final accuracy on the {task.validation_size} validation problems (never "
        "the test set). "
        if task.validation_size
        else ""
    )
    note = (
        f"Held-out sampled pass@1 ({cfg.base.eval_samples} samples per problem, {task.test_size} test "
        f"problems) after {cfg.base.steps} steps. {chosen}Collapsed: final accuracy below "
        f"{cfg.collapse_drop:g} x the initial accuracy. NLL+/NLL-: mean over steps of the positive/negative "
        "mean-NLL ratio."
    )
    parts = []
    if any(not math.isnan(r["chosen_lr"]) for r in tuned):
        parts += ["## Each objective at its validation-chosen lr, beside the default lr"]
        parts += [tuned_table(tuned, cfg)]
    else:
        parts += ["No validation set (base.task.validation_size=0): no lr is chosen."]
    parts += ["## Every cell (mean over seeds)", full_table(table), note]
    if cfg.weight_updates:
        parts += ["## Equal steps and equal wall time (weight-update arms)", wall_time_table(cfg, out)]
    return "\n\n".join(parts) + "\n"


def write_report(cfg: StudyConfig, out: Path) -> tuple[list[dict], list[dict]]:
    """Write the tables; return the per-(objective, k, lr) rows and the tuned rows."""
    cells, table = summarise(cfg, out)
    tuned = tuned_rows(cfg, table)
    write_csv(out / "cells.csv", cells)
    write_csv(out / "results.csv", table)
    write_csv(out / "tuned.csv", tuned)
    (out / "results.md").write_text(markdown_report(cfg, table, tuned, out))
    return table, tuned
