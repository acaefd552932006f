"""Typed configuration: pydantic models, YAML files and `key=value` overrides.

An override key is a dotted path (`optim.lr=3e-4`) or, when unambiguous, just the leaf name (`lr=3e-4`).
Every problem (unknown key, wrong type, bad value, unreadable file) becomes a UserError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from asympo.data.prompts import PromptConfig
from asympo.data.tasks import TaskConfig
from asympo.errors import UserError
from asympo.models.device import Precision, check_device_name
from asympo.models.tiny import TinyModelConfig
from asympo.objectives.common import ObjectiveConfig
from asympo.rollout.base import SamplingConfig

Cfg = TypeVar("Cfg", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Placed(Strict):
    """`device` and `precision` of the learner and the in-process engines (see asympo.models.device)."""

    device: str = "auto"  # auto (CUDA when present, else cpu), cpu, cuda, cuda:N
    precision: Precision = "auto"  # auto (bf16 where the hardware runs it fast), fp32, bf16

    @field_validator("device")
    @classmethod
    def _device(cls, name: str) -> str:
        return check_device_name(name)


class OpenAIEngineConfig(Strict):
    """`rollout.engine=openai`: any OpenAI-compatible server; only text comes back, never log-probs."""

    base_url: str = "http://127.0.0.1:8000/v1"
    served_model: str = ""  # the server's model name; empty: the first one /v1/models lists
    api_key_env: str = "ASYMPO_API_KEY"  # the environment variable holding the key (never logged)
    concurrency: int = Field(8, ge=1)  # requests in flight at once
    timeout: float = Field(300.0, gt=0)  # seconds per request
    retries: int = Field(5, ge=0)  # on connection errors, timeouts, 429 and 5xx, with exponential backoff
    backoff: float = Field(0.5, gt=0)  # seconds before the first retry; doubles each time
    weight_sync: Literal["serve", "none"] = "serve"  # serve: push weights to asympo serve's reload endpoint


class VLLMEngineConfig(Strict):
    """`rollout.engine=vllm`: vLLM in its own engine process (asympo.rollout.vllm; the `vllm` extra)."""

    kv_cache_gib: float | None = Field(None, gt=0)  # None: 1 GiB on a CPU build, vLLM's default on a GPU
    enforce_eager: bool = True  # skip torch.compile at start-up (20-40 s on a CPU); false: compiled graphs
    max_model_len: int | None = Field(None, ge=1)  # None: the model's own context length


class RolloutConfig(SamplingConfig):
    prompts_per_step: int = Field(32, ge=1)
    group_size: int = Field(8, ge=2)
    max_batch: int = Field(256, ge=1)  # sequences decoded at once; waiting prompts fill freed slots
    engine: Literal["hf", "openai", "vllm"] = "hf"  # hf: in-process transformers; vllm: vLLM (CPU or GPU)
    openai: OpenAIEngineConfig = OpenAIEngineConfig()
    vllm: VLLMEngineConfig = VLLMEngineConfig()
    # DAPO's dynamic sampling: drop groups whose (shaped) rewards are all equal and refill from more rollouts
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = Field(3, ge=1)  # next_batch calls one step may make
    # DAPO's overlong reward shaping: a linear penalty over the last `overlong_buffer` tokens before the cap
    overlong_buffer: int = Field(0, ge=0)  # L_cache; 0: off
    overlong_penalty: float = Field(1.0, ge=0)  # the penalty at the cap
    overlong_filter: bool = False  # DAPO's overlong filtering: truncated responses get no gradient

    @field_validator("overlong_buffer")
    @classmethod
    def _buffer_below_cap(cls, value: int, info) -> int:
        cap = info.data.get("max_new_tokens")
        if value and cap is not None and value >= cap:
            raise ValueError(
                f"rollout.overlong_buffer ({value}) must be below rollout.max_new_tokens ({cap}): the "
                "penalty ramps over the last overlong_buffer tokens before the cap"
            )
        return value

    @field_validator("temperature")
    @classmethod
    def _sampled(cls, value: float) -> float:
        """Training needs a sampled policy: the learner scores log-probabilities at this temperature, and a
        greedy (temperature 0) policy has none to score, nor any spread within a group to learn from."""
        if value <= 0:
            raise ValueError(
                "rollout.temperature must be > 0 for training: the learner scores the sampled policy at this "
                "temperature, and greedy rollouts have no log-probabilities to score (use `asympo eval` for "
                "greedy accuracy)"
            )
        return value


class OptimConfig(Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    warmup_steps: int = Field(20, ge=0)  # linear lr warmup: Adam's first updates are sign-like and large
    grad_clip: float = Field(1.0, gt=0)  # the same for every objective, so comparisons stay fair
    micro_batch_size: int = Field(128, ge=1)  # responses per forward/backward; groups are never split
    # optimiser updates per rollout batch, each on its share of the groups (never split); verl's
    # ppo_mini_batch_size, TRL's steps_per_generation. A version is one update, so a batch moves it this far
    minibatches: int = Field(1, ge=1)
    epochs: int = Field(
        1, ge=1
    )  # passes over the batch's mini-batches (verl's ppo_epochs, TRL's num_iterations)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time


class RuntimeConfig(Strict):
    mode: Literal["sync", "lag", "async"] = "async"  # lag is the deterministic one, for studies
    lag: int = Field(2, ge=0)  # lag mode: rollouts use the weights of exactly this many versions ago
    max_staleness: int = Field(2, ge=0)  # async: a group older than this many versions is dropped
    workers: int = Field(1, ge=1)  # async: rollout worker processes
    worker_threads: int = Field(1, ge=1)  # async: torch threads per worker
    # async: torch threads of the learner (main process); 0: torch's default, one per core. Sharing a core
    # with a worker costs less than leaving it idle while the worker waits (0.88-0.98x of sync here, 0.77x
    # with 1).
    learner_threads: int = Field(0, ge=0)
    jobs_per_worker: int = Field(2, ge=1)  # async: jobs queued per worker, so it never waits on the learner
    backend: Literal["local", "ray"] = "local"  # async: worker processes here, or Ray actors
    ray_address: str | None = None  # ray: join this cluster; none starts a local Ray
    ray_num_cpus: int | None = Field(None, ge=1)  # ray: CPUs of a local Ray (none: all of this machine's)
    # async: one device per rollout worker (cuda:1, cuda:2, ...); empty: every worker on the CPU when the
    # learner is there. Naming the learner's own GPU colocates a worker with it (after a memory check).
    worker_devices: list[str] = []

    @field_validator("worker_devices")
    @classmethod
    def _devices(cls, names: list[str]) -> list[str]:
        for name in names:
            check_device_name(name)
        return names


class FaultsConfig(Strict):
    reward_timeout: float = Field(5.0, gt=0)  # seconds per reward call; a hang gives reward 0 and is counted
    max_worker_restarts: int = Field(5, ge=0)  # async: past this many worker deaths the run stops
    max_skipped_steps: int = Field(5, ge=0)  # consecutive non-finite steps before the run stops


class BehaviourConfig(Strict):
    """Where behaviour log-probs come from, for the objectives that need them (grpo, dapo, ...)."""

    source: Literal["engine", "learner"] = "engine"  # learner: recomputed from version snapshots
    snapshots: Literal["memory", "disk"] = "memory"  # where the learner keeps old versions' weights
    compare: bool = False  # learner: the engine also returns log-probs, and their difference is logged


class LoraConfig(Strict):
    """LoRA through peft (the `lora` extra): the learner trains low-rank adapters on a frozen base; engines
    get merged weights (Ray actors: the adapters). verl's and TRL's lora_rank / lora_alpha."""

    rank: int = Field(0, ge=0)  # 0: off (full fine-tuning)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapters' input, in training only
    target_modules: list[str] | str = "all-linear"  # peft's: module names, a regex, or every linear layer


class LearnerConfig(Strict):
    """The learner's processes: above 1, a data-parallel learner sharded with FSDP2 (asympo.distributed)."""

    # ranks of the learner; `asympo train` starts them with torchrun (gloo on CPUs, NCCL on GPUs). Under a
    # torchrun you launch yourself, leave it at 1 (the launcher's world size is used) or give the same N
    processes: int = Field(1, ge=1)
    # who starts ranks 1..N-1: torchrun (processes on this machine), or Ray actors anywhere on the cluster
    # that form the group with this process as rank 0; auto: Ray when the rollouts run on Ray actors
    launcher: Literal["auto", "torchrun", "ray"] = "auto"


class TrainConfig(Placed):
    model: str = "tiny"  # tiny, tiny-random, smollm2, a model folder, a .gguf file or a hub id
    task: TaskConfig = TaskConfig()
    prompt: PromptConfig = PromptConfig()
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    behaviour: BehaviourConfig = BehaviourConfig()
    lora: LoraConfig = LoraConfig()
    learner: LearnerConfig = LearnerConfig()
    faults: FaultsConfig = FaultsConfig()
    reward: str = "exact"  # exact, math, math-lenient, math-format, or "package.module:function"
    steps: int = Field(200, ge=0)
    seed: int = 0
    eval_every: int = Field(50, ge=0)  # 0: only before and after
    eval_samples: int = Field(8, ge=1)  # samples per held-out problem for sampled pass@1
    out: str = "runs/train"
    tensorboard: bool = False
    wandb: bool = False  # also log the metrics to Weights & Biases (the `wandb` extra)
    wandb_project: str = "asympo"
    wandb_run_name: str = ""  # empty: W&B picks a name
    wandb_mode: Literal["online", "offline", "disabled"] = "online"  # offline: files under out/wandb only
    progress: bool = True
    save_model: bool = True  # write the trained model to out/final
    checkpoint_every: int = Field(50, ge=0)  # steps between checkpoints, and at the end (0: on a signal only)
    resume: bool = False  # continue from the newest checkpoint in out/checkpoints

    @model_validator(mode="after")
    def _minibatches_fit(self) -> TrainConfig:
        if self.optim.minibatches > self.rollout.prompts_per_step:
            raise ValueError(
                f"optim.minibatches={self.optim.minibatches} is more than the batch's "
                f"{self.rollout.prompts_per_step} groups (rollout.prompts_per_step): groups are never split"
            )
        return self


class SFTConfig(Placed):
    """Supervised warm start of the tiny model on the built-in task, so that RL has signal."""

    model: TinyModelConfig = TinyModelConfig()
    task: TaskConfig = TaskConfig()
    steps: int = Field(700, ge=1)  # lands the default tiny model at ~40% greedy, ~30% sampled accuracy
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)  # constant after warmup (see asympo.sft.lr_at)
    warmup: int = Field(100, ge=0)
    seed: int = 0
    eval_size: int = Field(200, ge=1)
    out: str = "runs/tiny-sft"
    progress: bool = True


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


class StudyConfig(Strict):
    """A grid of `asympo train` runs in the deterministic lag runtime: objectives x k x lr x seeds.

    An objective entry `name:variant` runs `name` with a variant's settings (STUDY_VARIANTS): `grpo:learner`
    recomputes behaviour log-probs in the learner, `asympo:group` scales ASymPO to pg's step size.
    """

    base: TrainConfig = STUDY_BASE  # every cell's settings; objective, lag, lr, seed and out are set per cell
    objectives: list[str] = ["pg", "spo", "asympo", "asympo:group", "grpo", "grpo:learner"]
    lags: list[int] = [0, 2, 4, 8]
    lrs: list[float] = [3e-5, 1e-4, 3e-4]  # each objective's lr is chosen per k on the validation set
    # objective entry -> {k: lr}: that entry runs at one lr per k instead of every lr in `lrs` (an lr chosen
    # by an earlier study); a k not listed takes the lr of the largest listed k below it (else the smallest)
    lr_table: dict[str, dict[int, float]] = {}
    seeds: list[int] = [0, 1, 2]
    # optimiser updates per batch (optim.minibatches); above 1 an objective's arm is named `name@mbN`
    minibatches: list[int] = Field([1], min_length=1)
    collapse_drop: float = Field(0.5, gt=0, lt=1)  # collapsed: final accuracy < collapse_drop * initial
    workers: int = Field(2, ge=1)  # cells run side by side in separate processes
    threads_per_worker: int = Field(1, ge=1)
    out: str = "runs/study"
    progress: bool = True

    @property
    def arms(self) -> list[str]:
        """What the tables compare: each objective at each minibatches setting (`grpo@mb4`)."""
        return [o if m == 1 else f"{o}@mb{m}" for m in self.minibatches for o in self.objectives]

    def lrs_for(self, arm: str, k: int) -> list[float]:
        """The lrs an arm (`grpo:learner@mb4`) runs at staleness k: its lr_table entry's, else every lr."""
        table = self.lr_table.get(arm.partition("@mb")[0])
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
        from asympo.objectives import OBJECTIVES

        for entry in names:
            name, *variants = entry.split(":")
            unknown = [v for v in variants if v not in STUDY_VARIANTS]
            if name not in OBJECTIVES or unknown:
                raise ValueError(
                    f"unknown objective '{entry}'; known: {', '.join(OBJECTIVES)}, each optionally with "
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
    model: str = "tiny"
    task: TaskConfig = TaskConfig()
    prompt: PromptConfig = PromptConfig()
    reward: str = "exact"  # as in train: a response is correct when its reward is at least 1
    reward_timeout: float = Field(5.0, gt=0)
    k: int = Field(8, ge=1)  # samples per problem for pass@k, avg@k and sampled pass@1
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(8, ge=1)
    max_batch: int = Field(256, ge=1)
    greedy: bool = True  # also greedy accuracy (one more pass over the problems)
    seed: int = 0
    json_out: str | None = None
    progress: bool = True


class ServeConfig(Placed):
    """`asympo serve`: an OpenAI-compatible HTTP server around the in-process engine."""

    model: str = "tiny"  # as in train: tiny, smollm2, a folder, a .gguf file or a hub id
    served_name: str = ""  # the name /v1/models reports; empty: the model setting
    host: str = "127.0.0.1"  # loopback only unless asked
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (printed at start)
    api_key_env: str = "ASYMPO_API_KEY"  # when this variable is set, requests must carry its value
    max_batch: int = Field(256, ge=1)  # sequences decoded at once across all waiting requests
    threads: int = Field(0, ge=0)  # torch threads; 0 leaves torch's default
    seed: int = 0
    version: int = 0  # the policy version reported until the first reload
    weights_dir: str = ""  # the folder the JSON `path` form of /v1/weights may read from; empty: form off
    header_timeout: float = Field(10.0, gt=0)  # seconds a client has to send its request line and headers
    body_timeout: float = Field(30.0, gt=0)  # seconds a request body may pause between two chunks


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    """Map each field's leaf name to every dotted path that ends in it."""
    out: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        path = prefix + name
        out.setdefault(name, []).append(path)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for leaf, paths in _leaf_paths(sub, path + ".").items():
                out.setdefault(leaf, []).extend(paths)
    return out


def _resolve_key(model: type[BaseModel], key: str) -> list[str]:
    if "." in key or key in model.model_fields:
        return key.split(".")
    paths = _leaf_paths(model).get(key, [])
    if len(paths) == 1:
        return paths[0].split(".")
    if not paths:
        raise UserError(f"unknown config key '{key}'")
    raise UserError(f"config key '{key}' is ambiguous: use one of {', '.join(sorted(paths))}")


def _is_named_section(model: type[BaseModel], path: list[str]) -> bool:
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) else None
        model = field.annotation if field else None
    return isinstance(model, type) and issubclass(model, BaseModel) and "name" in model.model_fields


def apply_override(data: dict[str, Any], model: type[BaseModel], item: str) -> None:
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    path = _resolve_key(model, key.strip())
    if _is_named_section(model, path) and isinstance(value, str):
        path = [*path, "name"]  # `objective=spo` is short for `objective.name=spo`
    *parents, leaf = path
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{key}': '{part}' is not a section")
    node[leaf] = value


PRESETS = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file, or a preset by name (`smollm2-arith`: asympo/configs/smollm2-arith.yaml)."""
    path = Path(path)
    if not path.exists() and str(path) == path.name and (PRESETS / f"{path}.yaml").exists():
        path = PRESETS / f"{path}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        presets = ", ".join(preset_names())
        raise UserError(f"config file not found: {path} (presets: {presets})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = "unknown config key" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"config {where}: {msg} (got {first.get('input')!r}){more}"


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_EVAL_FROM_ROLLOUT = ("temperature", "top_p", "max_new_tokens", "max_batch")


def eval_view(data: dict[str, Any]) -> dict[str, Any]:
    """A training config read by `asympo eval` (`eval -c smollm2-arith`): the same model, task, prompt, reward
    and sampling, the sections only training uses dropped. An eval config passes through unchanged."""
    if set(data) <= set(EvalConfig.model_fields):
        return data
    try:
        TrainConfig.model_validate(data)  # a typo in a training preset is named, not silently dropped
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
    view = {key: value for key, value in data.items() if key in EvalConfig.model_fields}
    rollout = data.get("rollout") or {}
    view |= {key: rollout[key] for key in _EVAL_FROM_ROLLOUT if key in rollout}
    if "reward_timeout" in (data.get("faults") or {}):
        view["reward_timeout"] = data["faults"]["reward_timeout"]
    return view


def build_config(model: type[Cfg], path: str | Path | None = None, overrides: list[str] = ()) -> Cfg:
    loaded = load_yaml(path) if path else {}
    if model is EvalConfig:
        loaded = eval_view(loaded)
    data = _merge(model().model_dump(), loaded)  # so a partial section keeps
    for item in overrides:  # its defaults, even where they differ from the section class's own
        apply_override(data, model, item)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
