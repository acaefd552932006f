"""Observability: a JSONL line per step (always), TensorBoard and W&B when asked, a rich progress bar and
summary."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from asympo.errors import UserError
from asympo.io import atomic_write_text
from asympo.rollout.base import Sample

console = Console(stderr=True)


def rollout_metrics(samples: list[Sample], learner_version: int) -> dict[str, float]:
    """What the batch looked like: reward, accuracy, lengths, truncation and staleness."""
    n = len(samples)
    staleness = Counter(learner_version - s.version for s in samples)
    lengths = [s.model_tokens for s in samples]  # an episode's: its model turns
    return {
        "reward": sum(s.reward for s in samples) / n,
        "accuracy": sum(s.extra.get("task_reward", s.reward) >= 1.0 for s in samples) / n,  # before shaping
        "response_len": sum(lengths) / n,
        "response_len_max": max(lengths),
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / n,
        "staleness_mean": sum(k * v for k, v in staleness.items()) / n,
        "staleness_hist": {str(k): v for k, v in sorted(staleness.items())},
        **version_metrics(samples, learner_version),
        **episode_metrics(samples),
    }


def episode_metrics(samples: list[Sample]) -> dict[str, float]:
    """Multi-turn episodes: each environment info key's mean per episode (`env_turns`, `env_tool_calls`...),
    except lost episodes, counted (`env_errors`, `env_timeouts`), and the share of the response tokens the
    learner scores that it trains on (the rest are the environment's); nothing for single-turn samples."""
    infos = [s.extra["env"] for s in samples if "env" in s.extra]
    if not infos:
        return {}
    keys = sorted({k for info in infos for k in info} | {"errors", "timeouts"})
    total = {k: sum(info.get(k, 0.0) for info in infos) for k in keys}
    scored = sum(len(s.response_ids) for s in samples)  # the learner scores every response token
    return {
        f"env_{k}": (int(v) if k in ("errors", "timeouts") else v / len(infos)) for k, v in total.items()
    } | {
        "trained_token_share": sum(s.model_tokens for s in samples) / max(scored, 1)  # the model's: trained
    }


def version_metrics(samples: list[Sample], learner_version: int) -> dict[str, float]:
    """Staleness split the way prime-rl reports it: versions published while a response was generated
    (`inflight`) and while it waited for the learner (`queue`), which add up to the staleness counted from
    its oldest token; and how many versions a response spans (in-flight weight updates)."""
    inflight = [s.finished_version - s.version for s in samples]
    queue = [learner_version - s.finished_version for s in samples]
    span = [s.newest_version - s.version for s in samples]
    n = len(samples)
    return {
        "staleness_inflight_mean": sum(inflight) / n,
        "staleness_inflight_max": max(inflight),
        "staleness_queue_mean": sum(queue) / n,
        "staleness_queue_max": max(queue),
        "version_span_mean": sum(span) / n,
        "version_span_max": max(span),
        "spanning_frac": sum(x > 0 for x in span) / n,
    }


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


@dataclass
class WandbSettings:
    project: str = "asympo"
    name: str = ""  # empty: W&B picks one
    mode: str = "online"  # online, offline (files under out/wandb, sync later) or disabled
    config: dict[str, Any] = field(default_factory=dict)  # the run's configuration, shown beside the charts


class MetricsLog:
    """One JSON object per step in `metrics.jsonl` (a previous run's file is kept as `metrics.N.jsonl`);
    scalars are mirrored to TensorBoard and W&B if asked (the same finite numbers, at the same step). On
    resume the file continues: lines of steps that will run again are dropped, so no step appears twice."""

    def __init__(
        self,
        out: Path,
        tensorboard: bool = False,
        resume_step: int | None = None,
        wandb: WandbSettings | None = None,
    ):
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) < resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif self.path.exists():  # a new run never mixes its steps into an old file, nor deletes it
            n = 1
            while (backup := out / f"metrics.{n}.jsonl").exists():
                n += 1
            self.path.rename(backup)
        self.file = self.path.open("a")  # noqa: SIM115 - lives as long as the run, closed by close()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # the `tensorboard` extra
            except ImportError:
                raise UserError(
                    "tensorboard=true needs the tensorboard package: pip install 'asympo[tensorboard]'"
                ) from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        self.wandb = None
        if wandb is not None:
            self.wandb = _start_wandb(out, wandb)

    def log(self, step: int, metrics: dict) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(out: Path, settings: WandbSettings) -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError("wandb=true needs the wandb package: pip install 'asympo[wandb]'") from None
    folder = out / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(
            project=settings.project,
            name=settings.name or None,
            mode=settings.mode,
            dir=str(out),
            config=settings.config,
            reinit="finish_previous",
        )
    except Exception as e:  # no account or no network in online mode: say how to go on without them
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot start W&B ({reason}); wandb_mode=offline logs without an account") from None


def _step_of(line: str) -> float:
    """A torn last line (the process was killed mid-write) sorts after every step, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right", overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    return table
