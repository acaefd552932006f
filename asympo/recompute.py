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
        """Fill in every sample's behaviour log-probs, each token under the version that produced it: a
        response that spans versions (in-flight updates) is scored once per version, and each token takes its
        own version's log-prob. Drop (and count) the samples that need a snapshot that is gone."""
        start = time.perf_counter()
        by_version: dict[int, list[Sample]] = defaultdict(list)
        for s in samples:
            for version in versions_of(s):
                by_version[version].append(s)
        scored: dict[int, torch.Tensor] = {}  # id(sample) -> its response's log-probs, version by version
        lost: set[int] = set()
        for version in sorted(by_version):
            group = [s for s in by_version[version] if id(s) not in lost]
            if not group:
                continue
            if version not in self.store.versions or not self._load(version):
                lost.update(id(s) for s in group)  # never train on log-probs of the wrong weights
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
                if s.token_versions is None:
                    scored[id(s)] = recomputed
                    continue
                mine = torch.tensor(s.token_versions) == version
                scored.setdefault(id(s), torch.zeros_like(recomputed))[mine] = recomputed[mine]
        self.dropped += sum(1 for s in samples if id(s) in lost)
        kept = [s for s in samples if id(s) not in lost]  # the runtime's order, groups intact
        diffs = [self._mismatch(s, scored[id(s)]) for s in kept if s.behaviour_logprobs is not None]
        for s in kept:
            s.behaviour_logprobs = scored[id(s)].tolist()
        stats = {
            "behaviour_dropped": self.dropped,
            "recompute_time": time.perf_counter() - start,
            "recompute_passes": sum(len(group) for group in by_version.values()) / max(len(samples), 1),
        }
        if diffs:
            diff = torch.cat(diffs)
            stats |= {
                "behaviour_lp_diff_mean": diff.mean().item(),
                "behaviour_lp_diff_max": diff.max().item(),
            }
        return kept, stats

    @staticmethod
    def _mismatch(sample: Sample, recomputed: torch.Tensor) -> torch.Tensor:
        """The engine sent its own log-probs too: their distance from the learner's, on the model's tokens."""
        diff = (recomputed - torch.tensor(sample.behaviour_logprobs)).abs()
        mask = sample.model_mask
        return diff if mask is None else diff[torch.tensor(mask, dtype=torch.bool)]


def versions_of(sample: Sample) -> list[int]:
    """The versions whose snapshots score a sample: each version among its tokens, or the one it came from."""
    return sorted(set(sample.token_versions)) if sample.token_versions else [sample.version]
