"""How rollouts are sampled and which engine makes them (`rollout`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from asympo.config.base import Strict


class SamplingConfig(Strict):
    """How responses are sampled: temperature, nucleus and length cap."""

    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 is greedy. Training needs > 0: the learner scores the same tempered policy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1: off."""
    max_new_tokens: int = Field(8, ge=1)
    """Response length cap, in tokens: 8 fits the tiny arithmetic; worked answers need hundreds or more."""


class OpenAIEngineConfig(Strict):
    """`rollout.engine=openai`: any OpenAI-compatible server; only text comes back, never log-probs."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """The server's base URL (up to and including `/v1`)."""
    served_model: str = ""
    """The model name to ask the server for; empty: the first one `/v1/models` lists."""
    api_key_env: str = "ASYMPO_API_KEY"
    """The environment variable holding the API key, sent as a Bearer header (never logged)."""
    concurrency: int = Field(8, ge=1)
    """Requests in flight at once."""
    timeout: float = Field(300.0, gt=0)
    """Seconds per request."""
    retries: int = Field(5, ge=0)
    """Retries on connection errors, timeouts, 429 and 5xx; past them the run stops with a checkpoint."""
    backoff: float = Field(0.5, gt=0)
    """Seconds before the first retry; doubles each time."""
    weight_sync: Literal["serve", "none"] = "serve"
    """`serve`: push each new policy to `asympo serve`'s reload endpoint (`/v1/weights`); `none`: leave the
    server's weights alone (e.g. a vLLM server you reload yourself)."""


class VLLMEngineConfig(Strict):
    """`rollout.engine=vllm`: vLLM in its own engine process (asympo.rollout.vllm; the `vllm` extra)."""

    kv_cache_gib: float | None = Field(None, gt=0)
    """The KV cache's size in GiB; null: 1 GiB on a CPU build (vLLM's own CPU default takes most of the RAM),
    vLLM's default on a GPU."""
    enforce_eager: bool = True
    """Skip torch.compile at start-up (20-40 s on a CPU); false: compiled graphs, faster decode."""
    max_model_len: int | None = Field(None, ge=1)
    """The context length vLLM allocates for; null: the model's own."""


class RolloutConfig(SamplingConfig):
    """How many rollouts a step samples, which engine makes them, and DAPO's sampling and shaping options."""

    prompts_per_step: int = Field(32, ge=1)
    """Prompts (groups) per optimiser step."""
    group_size: int = Field(8, ge=2)
    """Responses per prompt (G); advantages are relative to the group."""
    max_batch: int = Field(256, ge=1)
    """Sequences decoded at once; a finished sequence's slot goes to a waiting prompt. Lower it to save
    memory."""
    engine: Literal["hf", "openai", "vllm"] = "hf"
    """`hf` (in-process transformers), `openai` (any OpenAI-compatible server, text only) or `vllm` (vLLM in
    its own engine process, CPU or GPU)."""
    openai: OpenAIEngineConfig = OpenAIEngineConfig()
    """Settings of `engine=openai`."""
    vllm: VLLMEngineConfig = VLLMEngineConfig()
    """Settings of `engine=vllm`."""
    weight_updates: Literal["between_jobs", "inflight"] = "between_jobs"
    """When an async rollout worker takes newly published weights: `between_jobs` (a response comes from one
    version) or `inflight` (also between two decode steps, so a response may span versions; async runtime,
    asympo's engine in local workers or Ray actors, or vLLM with `inflight_kv=keep`)."""
    inflight_kv: Literal["keep", "recompute"] = "keep"
    """`inflight`: `keep` the keys/values live sequences computed under older weights (PipelineRL), or
    `recompute` them by prefilling every live sequence again under the new weights (AReaL)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose (shaped) rewards are all equal, so zero-advantage, and
    refill the step from more rollouts."""
    dynamic_sampling_max_rounds: int = Field(3, ge=1)
    """Dynamic sampling: at most this many rollout batches per step; short of `prompts_per_step` groups, the
    step trains on those kept."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO's overlong reward shaping: a penalty ramping linearly over the last this many tokens before
    `max_new_tokens`; 0: off. Must be below `max_new_tokens`."""
    overlong_penalty: float = Field(1.0, ge=0)
    """Overlong shaping: the penalty at the cap (the reward falls by up to this much)."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: truncated responses (cut at `max_new_tokens`) get no gradient."""

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
