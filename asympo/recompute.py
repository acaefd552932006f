"""Behaviour log-probs recomputed by the learner, so a rollout engine never has to return log-probs.

The learner produced every policy version, so it can score each sample under the snapshot of the version
that generated it, with its own numerics: no token alignment or engine/trainer mismatch to fight.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import PreTrainedModel

from asympo.batch import make_batch
from asympo.logprobs import token_logprobs
from asympo.models.device import CPU_FP32, Placement
from asympo.rollout.base import Sample
from asympo.snapshots import SnapshotStore


class BehaviourRecompute:
    def __init__(
        self,
        scratch: PreTrainedModel,
        store: SnapshotStore,
        pad_id: int,
        temperature: float = 1.0,
        placement: Placement = CPU_FP32,
    ):
        self.placement = placement
        self.scratch = (
            scratch.eval()
        )  # a second copy of the architecture; its weights are swapped per version
        self.store, self.pad_id, self.temperature = store, pad_id, temperature
        self.loaded_version: int | None = None
        self.dropped = 0

    def _load(self, version: int) -> bool:
        if self.loaded_version != version:
            weights = self.store.get(version)
            if weights is None:
                return False
            self.scratch.load_state_dict(weights, strict=False)
            self.loaded_version = version
        return True

    @torch.no_grad()
    def apply(self, samples: list[Sample]) -> tuple[list[Sample], dict[str, float]]:
        """Fill in every sample's behaviour log-probs; drop (and count) those whose snapshot is gone."""
        start = time.perf_counter()
        by_version: dict[int, list[Sample]] = defaultdict(list)
        for s in samples:
            by_version[s.version].append(s)
        ok, diffs = set(), []
        for version in sorted(by_version):
            group = by_version[version]
            if version not in self.store.versions or not self._load(version):
                self.dropped += len(group)  # never train on log-probs of the wrong weights
                continue
            batch = make_batch(group, self.pad_id, "mean")
            with self.placement.autocast():
                logprobs = token_logprobs(
                    self.scratch,
                    batch.input_ids.to(self.placement.device),
                    batch.attention_mask.to(self.placement.device),
                    self.temperature,
                ).cpu()
            for row, s in enumerate(group):
                first = len(s.prompt_ids) - 1  # every response token, an episode's environment tokens too
                recomputed = logprobs[row][first : first + len(s.response_ids)]
                if s.behaviour_logprobs is not None:  # the engine sent its own: measure the mismatch
                    diff = (recomputed - torch.tensor(s.behaviour_logprobs)).abs()
                    mask = s.model_mask
                    diffs.append(diff if mask is None else diff[torch.tensor(mask, dtype=torch.bool)])
                s.behaviour_logprobs = recomputed.tolist()
                ok.add(id(s))
        kept = [s for s in samples if id(s) in ok]  # the runtime's order, groups intact
        stats = {"behaviour_dropped": self.dropped, "recompute_time": time.perf_counter() - start}
        if diffs:
            diff = torch.cat(diffs)
            stats |= {
                "behaviour_lp_diff_mean": diff.mean().item(),
                "behaviour_lp_diff_max": diff.max().item(),
            }
        return kept, stats
