"""`asympo train`: the run's sections (optimiser, runtime, faults, behaviour, LoRA, learner ranks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from asympo.config.base import Placed, Strict, check_device_name
from asympo.config.data import PromptConfig, TaskConfig
from asympo.config.env import EnvConfig, verifiers_env
from asympo.config.objective import ObjectiveConfig
from asympo.config.rollout import RolloutConfig


class OptimConfig(Strict):
    """The optimiser (AdamW) and how a rollout batch is split into updates."""

    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate: the first knob to tune per objective and staleness."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW's first-moment decay."""
    beta2: float = Field(0.99, ge=0, lt=1)
    """AdamW's second-moment decay."""
    warmup_steps: int = Field(20, ge=0)
    """Linear lr warmup over this many updates: Adam's first updates are sign-like and large."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clip, the same for every objective so that comparisons stay fair."""
    micro_batch_size: int = Field(128, ge=1)
    """Responses per forward/backward (groups are never split): lower it to save memory, same result."""
    packing: Literal["none", "sorted", "packed"] = "packed"
    """How sequences fill the learner's rows. `none`: groups in batch order, each micro-batch padded to its
    own longest sequence; `sorted`: longest groups first, so similar lengths share a micro-batch; `packed`:
    as sorted, then several sequences per row (up to twice the longest), positions restarting and attention
    kept inside each (a block-diagonal mask; flash attention reads the bounds from the positions), where that
    saves a fifth of the tokens. The loss and gradient are the same (normalisers are the whole batch's;
    m2po's mask is per micro-batch); `pad_share` logs the padding. Measured on a long-tailed SmolLM2 batch:
    2.71x real tokens/s over padded rows, 1.32x over `sorted`; on the tiny model, equal
    (docs/performance.md)."""
    minibatches: int = Field(1, ge=1)
    """Optimiser updates per rollout batch, each on an equal share of its groups (verl's ppo_mini_batch_size,
    TRL's steps_per_generation). Each update is a policy version, so one batch advances it this far."""
    epochs: int = Field(1, ge=1)
    """Passes over the batch's mini-batches (verl's ppo_epochs, TRL's num_iterations): a batch takes
    `minibatches x epochs` updates."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less memory, ~30% more time."""


class RuntimeConfig(Strict):
    """How rollouts and training interleave: on-policy, a fixed lag, or asynchronous workers."""

    mode: Literal["sync", "lag", "async"] = "async"
    """`sync`: on-policy, generate then train; `lag`: rollouts from exactly `lag` versions ago, deterministic
    (for staleness studies); `async`: rollout workers in their own processes overlap with the learner."""
    lag: int = Field(2, ge=0)
    """Lag mode: the staleness k, rollouts use the weights of exactly this many versions ago."""
    lag_switch_at: int = Field(0, ge=0)
    """Lag mode: before this decode step of every batch, load the newest version (the learner's own), so
    every response still live then spans k versions, as in-flight updates make them, but deterministically
    (`rollout.inflight_kv` says what happens to the cache). All responses are live when `rollout.max_batch`
    holds the whole batch; one started after the switch is the newest version's alone. 0: never."""
    max_staleness: int = Field(2, ge=0)
    """Async: a group more than this many versions old is dropped (and counted)."""
    workers: int = Field(1, ge=1)
    """Async: rollout worker processes."""
    worker_threads: int = Field(1, ge=1)
    """Async: torch threads per worker."""
    learner_threads: int = Field(0, ge=0)
    """Async: torch threads of the learner; 0: torch's default, one per core. Sharing cores with the workers
    costs less than leaving them idle (0.88-0.98x of sync measured here, 0.77x with 1)."""
    jobs_per_worker: int = Field(2, ge=1)
    """Async: jobs queued per worker, so it keeps generating while the learner trains."""
    backend: Literal["local", "ray"] = "local"
    """Async: rollout workers as `local` processes, or `ray` actors (the `ray` extra)."""
    ray_address: str | None = None
    """Ray: the cluster to join (`HOST:PORT`, `ray://HOST:PORT` or `auto`); null: `RAY_ADDRESS` if set, else
    a local Ray."""
    ray_num_cpus: int | None = Field(None, ge=1)
    """Ray: CPUs given to a local Ray; null: all of this machine's."""
    publish: Literal["full", "delta"] = "full"
    """Ray: how a version reaches the actors. `delta` also stores the bits that changed since the version
    before, XORed and zstd-compressed, when that is smaller; an actor holding that version fetches the delta
    and rebuilds the new one bit for bit, others fetch it whole. A bf16 version's delta is 3-5% of it, but
    encoding and decoding cost about 2.5 s of CPU per GB on 2 cores: it pays on links slower than that."""
    worker_devices: list[str] = []
    """Async: a device per rollout worker, cycled (e.g. `[cuda:1,cuda:2]`); empty: the learner's device (a GPU
    only after a memory check). With Ray, `cuda` means "a GPU", and a GPU learner must set this."""

    @field_validator("worker_devices")
    @classmethod
    def _devices(cls, names: list[str]) -> list[str]:
        for name in names:
            check_device_name(name)
        return names


class FaultsConfig(Strict):
    """Limits that turn hangs and failures into counted events, and when the run gives up."""

    reward_timeout: float = Field(5.0, gt=0)
    """Seconds per reward call; a call that hangs or raises gives reward 0 and is counted."""
    max_worker_restarts: int = Field(5, ge=0)
    """Async: worker deaths survived (each worker restarted) before the run stops."""
    max_skipped_steps: int = Field(5, ge=0)
    """Consecutive non-finite steps skipped before the run stops."""


class BehaviourConfig(Strict):
    """Where behaviour log-probs come from, for the objectives that need them (grpo, dapo, ...)."""

    source: Literal["engine", "learner"] = "engine"
    """`engine` (returned with the samples) or `learner` (recomputed from snapshots of each version's
    weights: for engines that return none, like `rollout.engine=openai`)."""
    snapshots: Literal["memory", "disk"] = "memory"
    """Learner: keep the last lag + 1 versions' weights in `memory` or on `disk` (for large models)."""
    compare: bool = False
    """Learner: the engine also returns log-probs, and their difference is logged (checks the recompute)."""


class LoraConfig(Strict):
    """LoRA through peft (the `lora` extra): the learner trains low-rank adapters on a frozen base; engines
    get merged weights (Ray actors: the adapters). verl's and TRL's lora_rank / lora_alpha."""

    rank: int = Field(0, ge=0)
    """LoRA rank; 0: off (full fine-tuning). > 0 cuts the learner's gradient and optimiser memory."""
    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input, in training only (peft's lora_dropout)."""
    target_modules: list[str] | str = "all-linear"
    """Peft's target_modules: module names (`[q_proj,v_proj]`), a regex, or `all-linear` (every linear layer
    but the output head)."""


class LearnerConfig(Strict):
    """The learner's processes: above 1, a data-parallel learner sharded with FSDP2 (asympo.distributed)."""

    processes: int = Field(1, ge=1)
    """Ranks of the learner; `asympo train` starts them itself (gloo on CPUs, NCCL on GPUs). Under a
    torchrun you launch yourself, leave it at 1 (the launcher's world size is used) or give the same N."""
    launcher: Literal["auto", "torchrun", "ray"] = "auto"
    """Who starts ranks 1..N-1: `torchrun` (processes on this machine) or `ray` (actors anywhere on the
    cluster); `auto`: Ray when the rollouts run on Ray actors, else torchrun."""
    rendezvous_host: str | None = None
    """Under `launcher=ray`, the address at which the other ranks reach rank 0 (the driver): by default the
    driver's node address as Ray knows it. Set it where that is not routable from the other nodes (several
    network interfaces, NAT); gloo's and NCCL's own connections take the interface from GLOO_SOCKET_IFNAME
    and NCCL_SOCKET_IFNAME."""
    rendezvous_port: int | None = Field(None, ge=1, le=65535)
    """Under `launcher=ray`, rank 0's rendezvous port: by default a free one; set one that the cluster's
    firewall lets through."""


class TrainConfig(Placed):
    """`asympo train`: RL post-training of a model on a task, with an objective, runtime and optimiser."""

    model: str = "tiny"
    """`tiny` (the built-in warm start), `tiny-random` (untrained), `smollm2`, a local transformers folder,
    a `.gguf` file or a hub id."""
    task: TaskConfig = TaskConfig()
    """Where problems come from: built-in arithmetic or a dataset."""
    prompt: PromptConfig = PromptConfig()
    """How a question becomes the prompt the model sees."""
    env: EnvConfig = EnvConfig()
    """Multi-turn episodes: the environment that answers the model's turns; unset, single-turn."""
    rollout: RolloutConfig = RolloutConfig()
    """Sampling, batch shape and the rollout engine."""
    objective: ObjectiveConfig = ObjectiveConfig()
    """The loss and its knobs (`objective=spo` is short for `objective.name=spo`)."""
    optim: OptimConfig = OptimConfig()
    """The optimiser and the updates per batch."""
    runtime: RuntimeConfig = RuntimeConfig()
    """Sync, lag or async, and the async workers."""
    behaviour: BehaviourConfig = BehaviourConfig()
    """Where behaviour log-probs come from (behaviour-corrected objectives only)."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters instead of full fine-tuning."""
    learner: LearnerConfig = LearnerConfig()
    """A data-parallel learner over several processes."""
    faults: FaultsConfig = FaultsConfig()
    """Reward timeouts and how many failures the run survives."""
    reward: str = "exact"
    """`exact`, `math` (math-verify on the last `\\boxed{}`), `math-lenient` (also an unboxed last number),
    `math-format` (+0.1 for any boxed answer), `reasoning_gym` (the dataset's own scorer; the default for
    reasoning-gym tasks), or `package.module:function` taking (text, answer)."""
    steps: int = Field(200, ge=0)
    """Training steps (one rollout batch each)."""
    seed: int = 0
    """Seeds torch, sampling and the training-problem stream; studies repeat each cell over several seeds."""
    eval_every: int = Field(50, ge=0)
    """Held-out evaluation interval in steps; 0: only before and after training."""
    eval_samples: int = Field(8, ge=1)
    """Samples per held-out problem for sampled pass@1: more is less noisy and slower."""
    eval_max_batch: int | None = Field(None, ge=1)
    """Sequences the held-out evaluation decodes at once; unset: `rollout.max_batch`. Set it where a small
    rollout batch is a choice about training (a generation-bound study) that evaluation need not pay for."""
    out: str = "runs/train"
    """Output folder: metrics, checkpoints, the final model."""
    tensorboard: bool = False
    """Also write TensorBoard events (the `tensorboard` extra)."""
    wandb: bool = False
    """Also log the same metrics to Weights & Biases, at the same steps (the `wandb` extra)."""
    wandb_project: str = "asympo"
    """W&B project."""
    wandb_run_name: str = ""
    """W&B run name; empty: W&B picks one."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """`online`, `offline` (files under out/wandb, to `wandb sync` later; no account needed) or `disabled`."""
    progress: bool = True
    """Show the progress bar."""
    save_model: bool = True
    """Write the trained model to out/final."""
    checkpoint_every: int = Field(50, ge=0)
    """Steps between checkpoints in out/checkpoints, plus one at the end; 0: only when a signal
    (SIGINT/SIGTERM) or a failure stops the run."""
    resume: bool = False
    """Continue from the newest checkpoint in out/checkpoints."""

    @model_validator(mode="after")
    def _reasoning_gym_reward(self) -> TrainConfig:
        """A reasoning-gym task is scored by its own scorer unless another reward is asked for: `exact`
        would compare with the entry's JSON, which no response matches."""
        if self.task.name.startswith("reasoning_gym:") and self.reward == "exact":  # exact: never a match
            self.reward = "reasoning_gym"
        return self

    @model_validator(mode="after")
    def _verifiers_env(self) -> TrainConfig:
        self.env = verifiers_env(self.task.name, self.task.options, self.env)
        return self

    @model_validator(mode="after")
    def _minibatches_fit(self) -> TrainConfig:
        if self.optim.minibatches > self.rollout.prompts_per_step:
            raise ValueError(
                f"optim.minibatches={self.optim.minibatches} is more than the batch's "
                f"{self.rollout.prompts_per_step} groups (rollout.prompts_per_step): groups are never split"
            )
        return self
