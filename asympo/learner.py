"""The learner: current-policy log-probs, the objective, one optimiser step, versioned weights."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from asympo.batch import TrainBatch, computed_tokens, micro_batches, minibatches, pack, worth_packing
from asympo.config import LoraConfig, ObjectiveConfig, OptimConfig
from asympo.logprobs import score_tokens
from asympo.models.device import CPU_FP32, Placement, engine_copy
from asympo.models.lora import adapter_weights, apply_lora
from asympo.models.weights import publishable_weights
from asympo.objectives import compute_loss, get_objective
from asympo.objectives.common import LossInputs, masked

# normalised over the whole batch (responses or tokens), so micro-batches' values add up
SUMMED = ("loss", "loss_pos", "loss_neg", "kl_ref", "entropy")


def sign_split(name: str, values: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """Mean of a per-response value over positive- and over negative-advantage responses (absent if none)."""
    out = {}
    for suffix, rows in (("pos", advantages > 0), ("neg", advantages < 0)):
        if rows.any():
            out[f"{name}_{suffix}"] = values[rows].float().mean().item()
    return out


def nll_split(nll: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """Mean NLL of positive- and negative-advantage responses: the signature of the staleness failure."""
    out = sign_split("nll", nll, advantages)
    if "nll_pos" in out and out.get("nll_neg", 0) > 0:
        out["nll_ratio"] = out["nll_pos"] / out["nll_neg"]
    return out


def enable_checkpointing(model: PreTrainedModel) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing; older releases lack it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def adamw(model: PreTrainedModel, optim: OptimConfig) -> torch.optim.AdamW:
    """The fused AdamW where this torch has it: one pass over each parameter instead of several (on this
    CPU, 0.09 s instead of 0.28 s per step for SmolLM2's 135M parameters)."""
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters; the base gets no state
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # an older torch, or parameters on a device without the fused kernel
        return torch.optim.AdamW(params, **kwargs)


def combine_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """One batch's metrics from its updates'; a single update's come back as they are."""
    if len(updates) == 1:
        return updates[0]
    out: dict[str, float] = {}
    for key in {k for u in updates for k in u}:
        values = [u[key] for u in updates if key in u]
        if key in ("lr", "skipped_steps"):
            out[key] = values[-1]
        elif key.endswith("_time"):
            out[key] = sum(values)
        else:
            out[key] = sum(values) / len(values)
    return out | {"updates": len(updates)}


class Learner:
    """Owns the trainable policy and its optimiser; `version` counts the optimiser steps taken.

    The model stays in float32 on `placement.device` (the master weights, and AdamW's state beside them);
    under bf16 its forward and backward run in autocast."""

    def __init__(
        self,
        model: PreTrainedModel,
        objective: ObjectiveConfig,
        optim: OptimConfig,
        temperature: float = 1.0,
        max_len: int | None = None,
        placement: Placement = CPU_FP32,
        lora: LoraConfig | None = None,
    ):
        self.placement = placement
        self.peft = None  # lora.rank > 0: the PeftModel; its adapters are injected into `model` itself
        if lora is not None and lora.rank > 0:
            self.peft = apply_lora(model, lora)
        model = model.to(placement.device).train()
        self.objective = objective
        self.spec = get_objective(objective.name)
        self.optim_cfg = optim
        self.temperature = temperature
        self.max_len = max_len
        # the frozen reference of objective.kl_coef: the initial weights (a resume restores the policy after
        # this copy), in the engines' dtype since it only runs forward; none, and no extra forward, at 0
        self.reference = engine_copy(model, placement).eval() if objective.kl_coef > 0 else None
        self.track_entropy = True  # token entropy, logged every step (asympo bench measures it off)
        if optim.gradient_checkpointing:
            enable_checkpointing(model)
        self.model = self.shard(model)
        self.optimizer = adamw(self.model, optim)
        warmup = max(optim.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warmup)
        )
        self.version = 0
        self.skipped_steps = 0

    def shard(self, model: PreTrainedModel) -> PreTrainedModel:
        """Where a data-parallel learner splits the model across ranks (asympo.distributed); here, as is."""
        return model

    def plan(self, batch: TrainBatch) -> list[tuple[TrainBatch, float]]:
        """This process's micro-batches and their loss scales (a rank may add 0-scaled padding ones)."""
        return [
            (mb, 1.0) for mb in micro_batches(batch, self.optim_cfg.micro_batch_size, self.optim_cfg.packing)
        ]

    def combine(self, metrics: dict[str, float], rows: dict[str, list]) -> tuple[dict[str, float], dict]:
        """Sum metrics and join per-response values across ranks; one process has nothing to add."""
        return metrics, {k: torch.cat(v) if v else None for k, v in rows.items()}

    def clip_gradients(self) -> float:
        """The global gradient norm before clipping, as a float."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip))

    def weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """For engines, in the placement's dtype by default; `torch.float32` gives the master weights."""
        return publishable_weights(self.model, dtype or self.placement.dtype)

    def adapters(self) -> dict[str, torch.Tensor]:
        """Under LoRA, the adapter tensors alone (float32 CPU copies): what Ray actors receive."""
        return adapter_weights(self.model)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()  # evaluation may have switched it to eval mode, which turns off checkpointing
        total_responses, total_tokens = len(batch), int(batch.response_mask.sum())
        metrics: dict[str, float] = {}
        rows: dict[str, list[torch.Tensor]] = {"nll": [], "adv": [], "entropy": [], "length": []}
        self.optimizer.zero_grad(set_to_none=True)
        plan = self.plan(batch)
        # Dr.GRPO's constant normaliser: the response cap, else the batch's width (not a micro-batch's)
        max_len = self.max_len if self.max_len is not None else batch.response_mask.shape[1]
        real = [mb.attention_mask for mb, scale in plan if scale]  # a rank's padding micro-batches excluded
        packing = self.optim_cfg.packing
        metrics["computed_tokens"] = float(sum(computed_tokens(mb, packing) for mb, scale in plan if scale))
        metrics["real_tokens"] = float(sum(mask.sum() for mask in real))
        for mb, scale in plan:
            mb = mb.to(self.placement.device)
            proximal = None
            if self.spec.needs_proximal:  # AReaL's proximal policy: these weights, before this step's update
                with torch.no_grad():
                    proximal = self.logprobs(mb)
            logprobs, entropy = self.score(mb)
            reference = None
            if self.reference is not None:
                with torch.no_grad():
                    reference = self.logprobs(mb, self.reference)
            loss, mb_metrics = compute_loss(
                LossInputs(
                    logprobs=logprobs,
                    mask=mb.response_mask,
                    advantages=mb.advantages,
                    group_ids=mb.group_ids,
                    behaviour_logprobs=mb.behaviour_logprobs,  # current-policy objectives only log the KL
                    proximal_logprobs=proximal,
                    reference_logprobs=reference,
                    total_responses=total_responses,
                    total_tokens=total_tokens,
                    max_len=max_len,
                ),
                self.objective,
            )
            if loss.requires_grad:  # not when every response of the micro-batch left the loss mask
                (loss * scale if scale != 1.0 else loss).backward()  # (rollout.overlong_filter)
            if not scale:  # a rank's padding: it only keeps the collectives in step
                continue
            length = mb.response_mask.sum(-1)
            rows["length"].append(length)
            if entropy is not None:
                mb_metrics["entropy"] = float(masked(entropy, mb.response_mask).sum()) / max(total_tokens, 1)
                rows["entropy"].append(masked(entropy, mb.response_mask).sum(-1) / length.clamp(min=1))
            weight = len(mb) / total_responses
            for key, value in mb_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + (value if key in SUMMED else value * weight)
            rows["nll"].append(-masked(logprobs.detach(), mb.response_mask).sum(-1) / length.clamp(min=1))
            rows["adv"].append(mb.advantages)
        metrics, joined = self.combine(metrics, rows)
        metrics["pad_share"] = 1.0 - metrics.pop("real_tokens") / max(metrics.pop("computed_tokens"), 1.0)
        adv = joined["adv"]  # the splits are exact over the batch, not averaged per micro-batch
        metrics |= nll_split(joined["nll"], adv) | sign_split("length", joined["length"], adv)
        if joined["entropy"] is not None:  # a collapsing policy loses entropy on both sides; a drifting one
            metrics |= sign_split("entropy", joined["entropy"], adv)  # mostly on one
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        grad_norm = self.clip_gradients()
        if math.isfinite(grad_norm) and math.isfinite(metrics.get("loss", 0.0)):
            self.optimizer.step()
            self.scheduler.step()
            self.version += 1
        else:  # a NaN/inf step would poison the weights: drop it and keep the previous ones
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        metrics.update(
            grad_norm=grad_norm, skipped_steps=self.skipped_steps, learn_time=time.perf_counter() - start
        )
        return metrics

    def updates(self, batch: TrainBatch, on_update: Callable[[int], None] | None = None) -> dict[str, float]:
        """optim.epochs passes over optim.minibatches mini-batches of the batch, one `step` (optimiser update)
        each; `on_update(version)` after every update but the last (the lag runtime keeps each version).
        Metrics are the updates' means, except the times (summed), lr and the counters (the last)."""
        parts = minibatches(batch, self.optim_cfg.minibatches)
        done: list[dict[str, float]] = []
        for epoch in range(self.optim_cfg.epochs):
            for index, part in enumerate(parts):
                done.append(self.step(part))
                last = epoch == self.optim_cfg.epochs - 1 and index == len(parts) - 1
                if on_update is not None and not last:
                    on_update(self.version)
        return combine_updates(done)

    def logprobs(self, mb: TrainBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Float32 log-probs of the response tokens (the policy's, or `model`'s), in the placement's dtype."""
        return self._scores(mb, model or self.model, entropy=False)[0]

    def score(self, mb: TrainBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's log-probs and, when tracked, its token entropy from the same output-head chunks."""
        return self._scores(mb, self.model, entropy=self.track_entropy)

    def _scores(self, mb: TrainBatch, model: torch.nn.Module, entropy: bool):
        with self.placement.autocast():
            if self.optim_cfg.packing != "packed" or not worth_packing(mb):
                return score_tokens(
                    model, mb.input_ids, mb.attention_mask, self.temperature, mb.response_mask, entropy
                )
            packed = pack(mb.to(torch.device("cpu"))).to(mb.input_ids.device)
            # flash attention reads the sequences' bounds from the restarting positions (varlen), no mask
            flash = str(getattr(model.config, "_attn_implementation", "")).startswith("flash")
            logprobs, entropies = score_tokens(
                model,
                packed.input_ids,
                None if flash else packed.attention_mask,
                self.temperature,
                packed.positions,
                entropy,
                position_ids=packed.position_ids,
            )
            return packed.unpack(logprobs), None if entropies is None else packed.unpack(entropies)
