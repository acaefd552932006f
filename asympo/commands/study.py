"""`asympo study`: run the grid (resuming), then write the table and plots from the cells' metrics."""

from __future__ import annotations

from rich.markdown import Markdown

from asympo.config import StudyConfig
from asympo.metrics import console
from asympo.study.grid import run_grid
from asympo.study.plots import write_plots
from asympo.study.report import chosen_lrs, write_report


def run(cfg: StudyConfig) -> dict:
    out = run_grid(cfg)
    table, tuned = write_report(cfg, out)
    plots = write_plots(cfg, out, table, chosen_lrs(table))
    console.print(Markdown((out / "results.md").read_text()))
    console.print(
        f"study: table in {out / 'results.md'} and {out / 'results.csv'}; "
        f"plots: {', '.join(p.name for p in plots)}"
    )
    return {"out": str(out), "rows": tuned}
