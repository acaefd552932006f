"""PNG plots of the study: one panel per staleness k, one line per objective (mean over seeds), each
objective at its validation-chosen lr (the base lr without a validation set); final accuracy against k;
and final accuracy by lr."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from asympo.config import StudyConfig
from asympo.study.grid import cells_of, load_cell
from asympo.study.report import accuracy_curve

Picks = dict[tuple[str, int], float]  # (objective, k) -> the lr plotted


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed)."""
    import matplotlib  # the `study` extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # the `study` extra, once the backend is chosen

    return plt


def smooth(values: list[float], window: int = 10) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def _series(
    cfg: StudyConfig, out: Path, metric: str, picks: Picks
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(objective, k) -> (x, mean over seeds of y): held-out accuracy by eval, else a per-step metric."""
    runs: dict[tuple[str, int], list[tuple[list, list]]] = defaultdict(list)
    for cell in cells_of(cfg):
        if picks.get((cell.objective, cell.lag), cfg.lrs[0]) != cell.lr:
            continue
        result, steps = load_cell(out / "cells" / cell.name)
        if metric == "test_accuracy":
            xs, ys = zip(*accuracy_curve(result, steps), strict=True)
        else:
            xs, ys = zip(*[(m["step"], m.get(metric)) for m in steps if "reward" in m], strict=True)
            ys = [np.nan if y is None else y for y in ys]
        runs[(cell.objective, cell.lag)].append((list(xs), list(ys)))
    series = {}
    for key, seeds in runs.items():
        n = min(len(ys) for _, ys in seeds)
        series[key] = (np.asarray(seeds[0][0][:n]), np.nanmean([ys[:n] for _, ys in seeds], axis=0))
    return series


def _panels(
    cfg: StudyConfig,
    out: Path,
    metrics: list[tuple[str, str]],
    ylabel: str,
    path: Path,
    window: int,
    picks: Picks,
):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(cfg.lags), figsize=(4.2 * len(cfg.lags), 3.6), sharey=True, squeeze=False)
    colours = _colours(cfg, plt)
    for metric, style in metrics:
        series = _series(cfg, out, metric, picks)
        for ax, k in zip(axes[0], cfg.lags, strict=True):
            for objective in cfg.arms:
                x, y = series[(objective, k)]
                if window > 1 and len(y) >= window:
                    y, x = smooth(list(y), window), x[window - 1 :]
                lr = picks.get((objective, k), cfg.lrs[0])
                label = f"{objective} (lr {lr:g})" if style == "-" else None
                ax.plot(x, y, style, color=colours[objective], label=label, linewidth=1.4)
            ax.set_title(f"staleness k = {k}")
            ax.set_xlabel("optimiser step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colours(cfg: StudyConfig, plt) -> dict[str, object]:
    """Up to 10 arms the default cycle; more (objectives x minibatches) take tab20, so no two share one."""
    if len(cfg.arms) <= 10:
        return {o: f"C{i}" for i, o in enumerate(cfg.arms)}
    return {o: plt.cm.tab20(i % 20) for i, o in enumerate(cfg.arms)}


def final_plot(cfg: StudyConfig, table: list[dict], picks: Picks, path: Path) -> None:
    """Final test accuracy against staleness k (mean ± std over seeds, each arm at its plotted lr), one panel
    per optim.minibatches setting: whether an objective holds its on-policy accuracy as k grows."""
    plt = pyplot()

    entries = list(dict.fromkeys(a.partition("@mb")[0] for a in cfg.arms))
    panels = cfg.minibatches
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.0), sharey=True, squeeze=False)
    rows = {(r["objective"], r["k"], r["lr"]): r for r in table}
    for ax, minibatches in zip(axes[0], panels, strict=True):
        for i, entry in enumerate(entries):
            arm = entry if minibatches == 1 else f"{entry}@mb{minibatches}"
            picked = [rows[(arm, k, picks[(arm, k)])] for k in cfg.lags]
            means, stds = [r["final_mean"] for r in picked], [r["final_std"] for r in picked]
            ax.errorbar(
                range(len(cfg.lags)),
                means,
                yerr=stds,
                fmt="o-",
                color=f"C{i % 10}",
                label=entry,
                capsize=3,
                linewidth=1.4,
            )
        ax.set_xticks(range(len(cfg.lags)), [str(k) for k in cfg.lags])
        ax.set_title(f"{minibatches} update{'s' if minibatches > 1 else ''} per batch")
        ax.set_xlabel("staleness k (optimiser updates)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final held-out accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_plot(cfg: StudyConfig, table: list[dict], path: Path) -> None:
    """Final test accuracy against lr, one panel per k: how sensitive each objective is to its step."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(cfg.lags), figsize=(4.2 * len(cfg.lags), 3.6), sharey=True, squeeze=False)
    colours = _colours(cfg, plt)
    for ax, k in zip(axes[0], cfg.lags, strict=True):
        for objective in cfg.arms:
            rows = [r for r in table if (r["objective"], r["k"]) == (objective, k)]
            lrs, finals = [r["lr"] for r in rows], [r["final_mean"] for r in rows]
            ax.plot(lrs, finals, "o-", color=colours[objective], label=objective)
        ax.set_xscale("log")
        ax.set_title(f"staleness k = {k}")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final held-out accuracy (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(cfg: StudyConfig, out: Path, table: list[dict], picks: Picks) -> list[Path]:
    """`picks` chooses each line's lr; without one (no validation set) the base lr if the arm ran it, else
    the arm's first."""

    def fallback(arm: str, k: int) -> float:
        lrs = cfg.lrs_for(arm, k)
        return cfg.base.optim.lr if cfg.base.optim.lr in lrs else lrs[0]

    picks = {(o, k): picks.get((o, k), fallback(o, k)) for o in cfg.arms for k in cfg.lags}
    plots = [
        ([("test_accuracy", "-")], "held-out accuracy (sampled pass@1)", "accuracy.png", 1),
        ([("reward", "-")], "training reward (10-step mean)", "reward.png", 10),
        ([("nll_ratio", "-")], "NLL+ / NLL- (10-step mean)", "nll_ratio.png", 10),
        ([("grad_norm", "-")], "gradient norm before clipping (10-step mean)", "grad_norm.png", 10),
        ([("entropy", "-")], "policy token entropy, nats (10-step mean)", "entropy.png", 10),
        (
            [("loss_pos", "-"), ("loss_neg", "--")],
            "loss split: positive (solid), negative (dashed)",
            "loss_split.png",
            10,
        ),
    ]
    paths = []
    for metrics, ylabel, name, window in plots:
        _panels(cfg, out, metrics, ylabel, out / name, window, picks)
        paths.append(out / name)
    final_plot(cfg, table, picks, out / "final.png")
    paths.append(out / "final.png")
    if len(cfg.lrs) > 1:
        lr_plot(cfg, table, out / "lr.png")
        paths.append(out / "lr.png")
    return paths
