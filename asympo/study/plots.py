"""PNG plots of the study: one panel per staleness k, one line per objective (mean over seeds)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from asympo.config import StudyConfig
from asympo.study.grid import cells_of, load_cell
from asympo.study.report import accuracy_curve


def smooth(values: list[float], window: int = 10) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def _series(cfg: StudyConfig, out: Path, metric: str) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(objective, k) -> (x, mean over seeds of y): held-out accuracy by eval, else a per-step metric."""
    runs: dict[tuple[str, int], list[tuple[list, list]]] = defaultdict(list)
    for cell in cells_of(cfg):
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
    cfg: StudyConfig, out: Path, metrics: list[tuple[str, str]], ylabel: str, path: Path, window: int
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.lags), figsize=(4.2 * len(cfg.lags), 3.6), sharey=True, squeeze=False)
    colours = {o: f"C{i}" for i, o in enumerate(cfg.objectives)}
    for metric, style in metrics:
        series = _series(cfg, out, metric)
        for ax, k in zip(axes[0], cfg.lags, strict=True):
            for objective in cfg.objectives:
                x, y = series[(objective, k)]
                if window > 1 and len(y) >= window:
                    y, x = smooth(list(y), window), x[window - 1 :]
                label = objective if style == "-" else None
                ax.plot(x, y, style, color=colours[objective], label=label, linewidth=1.4)
            ax.set_title(f"staleness k = {k}")
            ax.set_xlabel("optimiser step")
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(cfg: StudyConfig, out: Path) -> list[Path]:
    plots = [
        ([("test_accuracy", "-")], "held-out accuracy (sampled pass@1)", "accuracy.png", 1),
        ([("reward", "-")], "training reward (10-step mean)", "reward.png", 10),
        ([("nll_ratio", "-")], "NLL+ / NLL- (10-step mean)", "nll_ratio.png", 10),
        (
            [("loss_pos", "-"), ("loss_neg", "--")],
            "loss split: positive (solid), negative (dashed)",
            "loss_split.png",
            10,
        ),
    ]
    paths = []
    for metrics, ylabel, name, window in plots:
        _panels(cfg, out, metrics, ylabel, out / name, window)
        paths.append(out / name)
    return paths
