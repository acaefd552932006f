"""asympo's objectives inside TRL's `GRPOTrainer` (install with `pip install 'asympo[trl]'`).

TRL keeps doing what it does (sampling, rewards, group advantages, batching, logging); only the loss is
replaced, by `asympo.objectives.compute_loss` on TRL's own batch, so the formulas live in one place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from trl import GRPOTrainer
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError("asympo.integrations.trl needs TRL: pip install 'asympo[trl]'") from e

from asympo.config import ObjectiveConfig
from asympo.objectives import LossInputs, ObjectiveError, compute_loss, get_objective

GROUP_KEY = "asympo_group_ids"
# Extra forward inputs TRL hands its log-prob helper for vision-language models; passed through unchanged.
FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


class AsympoGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose loss is an asympo objective (`asympo`, `spo`, `pg`, ... or an ObjectiveConfig).

    What the objective receives, all from TRL:
    - log-probs: TRL's `_get_per_token_logps_and_entropies` under the current weights (so TRL's
      temperature scaling applies), mask: the completion mask (times the tool mask, as in TRL);
    - advantages: TRL's `inputs["advantages"]`, i.e. (r - group mean) / (group std + 1e-4) with Bessel's
      std under `scale_rewards="group"` (the default), r - group mean under `"none"`. Choose them there:
      `ObjectiveConfig.advantage` must stay unset;
    - group ids: TRL scores each run of `num_generations` consecutive completions as one group, then
      shuffles the batch; `_generate_and_score_completions` tags every row with that group before the
      shuffle, so `asympo_scale="group"` sees real groups (the members present in the micro-batch);
    - behaviour log-probs, only for objectives that need them (`grpo`, `dapo`, ...): TRL's
      `old_per_token_logps`. TRL skips computing them exactly when they equal the current log-probs
      (one gradient step per generation batch), and then, like TRL's own loss, the detached current
      log-probs are used (ratio 1).

    Each micro-batch is normalised on its own (responses or tokens of that micro-batch) and divided by the
    gradient-accumulation steps, as TRL's `grpo` loss type does. TRL's loss knobs (`loss_type`, `epsilon`,
    entropy options) do not apply; the ObjectiveConfig's do. Every scalar diagnostic of the objective is
    logged as `asympo/<name>` (values of this process).
    """

    def __init__(self, *args: Any, objective: str | ObjectiveConfig = "asympo", **kwargs: Any) -> None:
        cfg = objective if isinstance(objective, ObjectiveConfig) else ObjectiveConfig(name=objective)
        spec = get_objective(cfg.name)
        if spec.needs_proximal:
            raise ObjectiveError(f"objective '{cfg.name}' needs proximal log-probs: TRL has none")
        if cfg.advantage is not None:
            raise ObjectiveError(
                "advantages come from TRL: leave ObjectiveConfig.advantage unset and choose them with "
                "GRPOConfig.scale_rewards ('group' ~ group_norm, 'none' ~ mean)"
            )
        args_ = kwargs.get("args", args[2] if len(args) > 2 else None)
        if args_ is not None and args_.beta != 0.0:
            raise ObjectiveError("asympo objectives have no KL-to-reference term: set GRPOConfig.beta=0.0")
        self.objective, self._needs_behaviour = cfg, spec.needs_behaviour
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch plus each row's group id, tagged before TRL shuffles the rows apart."""
        output = super()._generate_and_score_completions(inputs)
        size = output["advantages"].shape[0]
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        first = self.accelerator.process_index * size  # this process's slice of the gathered batch
        rows = torch.arange(first, first + size, device=output["advantages"].device)
        output[GROUP_KEY] = torch.div(rows, group_size, rounding_mode="floor")
        return output

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | None = None,
    ) -> Tensor:
        """The objective's loss on TRL's batch, in the public Trainer hook (TRL's `_compute_loss` unused)."""
        if return_outputs:
            raise ValueError("AsympoGRPOTrainer does not support returning outputs")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logprobs, _, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs[key] for key in FORWARD_KEYS if key in inputs},
        )
        behaviour = None
        if self._needs_behaviour:
            behaviour = inputs.get("old_per_token_logps")
            behaviour = logprobs.detach() if behaviour is None else behaviour
        advantages = inputs["advantages"]
        loss, metrics = compute_loss(
            LossInputs(
                logprobs=logprobs,
                mask=mask.bool(),
                advantages=advantages,
                group_ids=inputs.get(GROUP_KEY, torch.arange(advantages.shape[0], device=advantages.device)),
                behaviour_logprobs=behaviour,
                max_len=self.max_completion_length,
            ),
            self.objective,
        )
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][f"asympo/{name}"].append(value)
        if aux_loss is not None:  # MoE load balancing, as TRL adds it
            loss = loss + self.router_aux_loss_coef * aux_loss
        return loss / self.current_gradient_accumulation_steps if mode == "train" else loss


__all__ = ["AsympoGRPOTrainer"]
