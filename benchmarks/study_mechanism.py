"""Where an objective's staleness behaviour comes from, read back from a study's cells: per (arm, k, lr),
means over seeds of each cell's per-step diagnostics (all steps, and the last third), and how often the
gradient norm hit the clip.

Usage: python benchmarks/study_mechanism.py runs/study [k=4] [lr=1e-4] [seeds=0,1]"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

KEYS = [
    "grad_norm",
    "nll_ratio",
    "behaviour_kl",
    "clip_frac",
    "m2",
    "m2_kept",
    "entropy",
    "asympo_scale_mean",
    "asympo_scale_pos",
    "asympo_scale_neg",
    "asympo_scale_max",
    "loss_pos",
    "loss_neg",
]
CELL = re.compile(r"(?P<arm>.+)-k(?P<k>\d+)-lr(?P<lr>.+)-s(?P<seed>\d+)$")


def cell_means(folder: Path, clip: float) -> dict[str, float]:
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward" in m]
    late = steps[2 * len(steps) // 3 :]
    out = {}
    for key in KEYS:
        values = [m[key] for m in steps if m.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
            out[key + "_late"] = statistics.fmean([m[key] for m in late if m.get(key) is not None] or [0.0])
    out["clipped_steps"] = statistics.fmean([m["grad_norm"] > clip for m in steps])
    result = json.loads((folder / "result.json").read_text())
    out["final"] = result["accuracy_after"]
    return out


def main(study: Path, filters: dict[str, str]) -> None:
    config = json.loads((study / "study.json").read_text())
    clip = config["base"]["optim"]["grad_clip"]
    rows: dict[tuple[str, int, float], list[dict]] = defaultdict(list)
    for folder in sorted((study / "cells").iterdir()):
        match = CELL.match(folder.name)
        if not match or not (folder / "result.json").exists():
            continue
        k, lr = int(match["k"]), float(match["lr"])
        if ("k" in filters and k != int(filters["k"])) or ("lr" in filters and lr != float(filters["lr"])):
            continue
        if "seeds" in filters and match["seed"] not in filters["seeds"].split(","):
            continue
        rows[(match["arm"], k, lr)].append(cell_means(folder, clip))
    shown = [
        "final",
        "grad_norm",
        "clipped_steps",
        "nll_ratio",
        "nll_ratio_late",
        "behaviour_kl",
        "clip_frac",
        "m2",
        "m2_kept",
    ]
    shown += ["entropy", "entropy_late", "asympo_scale_mean", "asympo_scale_pos", "asympo_scale_neg"]
    shown += ["asympo_scale_max", "loss_pos", "loss_neg"]
    print("| arm | k | lr | seeds | " + " | ".join(shown) + " |")
    print("|" + "---|" * (len(shown) + 4))
    for (arm, k, lr), cells in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        means = [
            statistics.fmean([c[s] for c in cells if s in c]) if any(s in c for c in cells) else None
            for s in shown
        ]
        cells_text = " | ".join("-" if v is None else f"{v:.3g}" for v in means)
        print(f"| {arm} | {k} | {lr:g} | {len(cells)} | {cells_text} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:]))
