"""The learner: current-policy log-probs, the objective, one optimiser step, versioned weights."""

from __future__ import annotations

import math
import time

import torch
from transformers import PreTrainedModel

from asympo.batch import TrainBatch, micro_batches
from asympo.config import OptimConfig
from asympo.logprobs import token_logprobs
from asympo.models.device import CPU_FP32, Placement
from asympo.models.tying import tied_aliases
from asympo.objectives import compute_loss, get_objective
from asympo.objectives.common import LossInputs, ObjectiveConfig, masked

SUMMED = ("loss", "loss_pos", "loss_neg")  # contributions are normalised over the whole batch: they add up


def nll_split(nll: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """Mean NLL of positive- and negative-advantage responses: the signature of the staleness failure."""
    out = {}
    for name, rows in (("nll_pos", advantages > 0), ("nll_neg", advantages < 0)):
        if rows.any():
            out[name] = nll[rows].mean().item()
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
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # an older torch, or parameters on a device without the fused kernel
        return torch.optim.AdamW(model.parameters(), **kwargs)


def publishable_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A detached CPU copy to publish to rollout engines, in the engines' dtype (`dtype`: bf16 halves what
    each version costs to copy, keep and send). A tied alias (`lm_head.weight` sharing the embedding) is
    left out, as `save_pretrained` does: engines load it through their own tie, and each published version
    is one embedding smaller (113 MB for SmolLM2 in float32)."""
    state = model.state_dict()
    aliases = tied_aliases(state)
    # cast where the tensor lives, then copy: a GPU sends bf16 over the bus, not float32 to convert here
    return {
        name: t.detach().to(dtype=dtype if t.is_floating_point() else None, copy=True).cpu()
        for name, t in state.items()
        if name not in aliases
    }


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
    ):
        self.placement = placement
        self.model = model.to(placement.device).train()
        self.objective = objective
        self.spec = get_objective(objective.name)
        self.optim_cfg = optim
        self.temperature = temperature
        self.max_len = max_len
        self.optimizer = adamw(model, optim)
        warmup = max(optim.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warmup)
        )
        self.version = 0
        self.skipped_steps = 0
        if optim.gradient_checkpointing:
            enable_checkpointing(model)

    def weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """For engines, in the placement's dtype by default; `torch.float32` gives the master weights."""
        return publishable_weights(self.model, dtype or self.placement.dtype)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()  # evaluation may have switched it to eval mode, which turns off checkpointing
        total_responses, total_tokens = len(batch), int(batch.response_mask.sum())
        metrics: dict[str, float] = {}
        nll, adv = [], []
        self.optimizer.zero_grad(set_to_none=True)
        for mb in micro_batches(batch, self.optim_cfg.micro_batch_size):
            mb = mb.to(self.placement.device)
            proximal = None
            if self.spec.needs_proximal:  # AReaL's proximal policy: these weights, before this step's update
                with torch.no_grad():
                    proximal = self.logprobs(mb)
            logprobs = self.logprobs(mb)
            loss, mb_metrics = compute_loss(
                LossInputs(
                    logprobs=logprobs,
                    mask=mb.response_mask,
                    advantages=mb.advantages,
                    group_ids=mb.group_ids,
                    behaviour_logprobs=mb.behaviour_logprobs,  # current-policy objectives only log the KL
                    proximal_logprobs=proximal,
                    total_responses=total_responses,
                    total_tokens=total_tokens,
                    max_len=self.max_len,
                ),
                self.objective,
            )
            loss.backward()
            weight = len(mb) / total_responses
            for key, value in mb_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + (value if key in SUMMED else value * weight)
            nll.append(
                -masked(logprobs.detach(), mb.response_mask).sum(-1) / mb.response_mask.sum(-1).clamp(min=1)
            )
            adv.append(mb.advantages)
        metrics |= nll_split(
            torch.cat(nll), torch.cat(adv)
        )  # exact over the batch, not averaged per micro-batch
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip))
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

    def logprobs(self, mb: TrainBatch) -> torch.Tensor:
        """Float32 log-probs of the response tokens, computed in the placement's precision."""
        with self.placement.autocast():
            return token_logprobs(
                self.model, mb.input_ids, mb.attention_mask, self.temperature, mb.response_mask
            )
