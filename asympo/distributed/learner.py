"""`ShardedLearner`: the learner on N ranks with FSDP2 (`fully_shard` per decoder layer, then the root).

A step equals the single-process step on the same batch: the batch's groups are dealt to ranks (never
split), every rank's loss keeps the whole batch's normalisers (responses, tokens), and gradients are summed
across ranks (each rank's loss is scaled by the rank count, which FSDP's gradient average divides out), so
the rank losses add up to the one-process loss.
Each rank runs the same number of micro-batches, padding with 0-scaled ones, because every forward and
backward is collective. Clipping uses the global norm (a DTensor over all shards).

Rank 0 drives: each collective method announces itself (`_announce`) with a broadcast, and `follow()` on the
other ranks runs the same method with the same argument. A rank only ever enters collectives rank 0 entered.
"""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedModel

from asympo.batch import TrainBatch, micro_batches
from asympo.checkpoint import unflatten
from asympo.learner import Learner
from asympo.logprobs import score_tokens
from asympo.models.tying import tied_aliases
from asympo.models.weights import publishable_weights

PARTING_TIMEOUT = timedelta(seconds=30)  # how long the ranks wait for each other at the end of a run


def deal_groups(batch: TrainBatch, ranks: int) -> list[TrainBatch | None]:
    """Split the batch into `ranks` parts of whole groups, balanced by response count (greedy, largest
    group first); a part may be None when there are fewer groups than ranks."""
    groups = batch.group_ids.unique(sorted=True).tolist()
    sizes = {g: int((batch.group_ids == g).sum()) for g in groups}
    parts: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for g in sorted(groups, key=lambda g: (-sizes[g], g)):
        target = loads.index(min(loads))
        parts[target].append(g)
        loads[target] += sizes[g]
    out: list[TrainBatch | None] = []
    for part in parts:
        rows = torch.isin(batch.group_ids, torch.tensor(sorted(part), dtype=batch.group_ids.dtype))
        out.append(batch.select(rows.nonzero()[:, 0]) if part else None)
    return out


class ShardedLearner(Learner):
    """The Learner on every rank of the process group; rank 0's instance drives the others'."""

    def shard(self, model: PreTrainedModel) -> PreTrainedModel:
        """One FSDP unit per decoder layer, and the root around the scoring forward (`_Scorer`): the learner
        calls the decoder and the output head itself (asympo.logprobs), not the model's forward, so the
        root must be the module whose forward runs for the embedding, norm and head to be gathered."""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.aliases = tied_aliases(model.state_dict())  # a gathered state dict copies tied weights apart
        mesh = init_device_mesh(self.placement.device.type, (self.world,))
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        self.scorer = _Scorer(model)
        fully_shard(self.scorer, mesh=mesh)
        return model

    def logprobs(self, mb: TrainBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        if model is not None and model is not self.model:
            return super().logprobs(mb, model)  # the KL reference: a whole copy on every rank
        with self.placement.autocast():
            return self.scorer(mb.input_ids, mb.attention_mask, self.temperature, mb.response_mask, False)[0]

    def score(self, mb: TrainBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.placement.autocast():
            args = (mb.input_ids, mb.attention_mask, self.temperature, mb.response_mask, self.track_entropy)
            return self.scorer(*args)

    # --- rank 0 announces, the others follow -------------------------------------------------------------

    def _announce(self, command: str, argument=None) -> None:
        if self.rank == 0:
            message = [(command, argument)]
            dist.broadcast_object_list(message, src=0)

    def follow(self) -> None:
        """On ranks > 0: run what rank 0 announces until it says stop."""
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            command, argument = message[0]
            if command == "stop":
                if argument:
                    _part()
                return
            getattr(self, f"_{command}")(argument)

    def release(self, part: bool = True) -> None:
        """Rank 0, at the end of the run (or on its way out of a failed one): let the followers return. A
        failed run leaves without the parting barrier, which would wait for a rank that may be dead."""
        self._announce("stop", part)
        if part:
            _part()

    # --- the collective operations ----------------------------------------------------------------------

    def step(self, batch: TrainBatch | None = None) -> dict[str, float]:
        self._announce("step", batch)
        return self._step(batch)

    def _step(self, batch: TrainBatch) -> dict[str, float]:
        return super().step(batch)

    def weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The full state dict on rank 0 (a gather from every rank), in the engines' dtype; {} elsewhere."""
        self._announce("weights", dtype)
        return self._weights(dtype)

    def _weights(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)  # rank 0 holds it, the others get {}
        if self.rank != 0:
            return {}
        holder = _StateHolder({k: v for k, v in full.items() if k not in self.aliases})
        return publishable_weights(holder, dtype or self.placement.dtype)

    def save_shards(self, folder: Path) -> None:
        """Every rank writes its shards of the model and AdamW state with torch.distributed.checkpoint."""
        self._announce("save_shards", folder)
        self._save_shards(folder)

    def _save_shards(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))

    def load_shards(self, folder: Path) -> None:
        """Every rank reads its shards back (same rank count); the followers also take the scheduler and
        counters from the checkpoint's state.json, which rank 0 restores on its own."""
        self._announce("load_shards", folder)
        self._load_shards(folder)

    def _load_shards(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        if self.rank != 0:  # rank 0 restores these in asympo.checkpoint.load_checkpoint
            meta = json.loads((folder.parent / "state.json").read_text())
            self.version, self.skipped_steps = meta["train"]["version"], meta["train"]["skipped_steps"]
            self.scheduler.load_state_dict(unflatten(meta["scheduler"], {}))  # LambdaLR's: no tensors

    # --- the pieces of a step that differ across ranks --------------------------------------------------

    def plan(self, batch: TrainBatch) -> list[tuple[TrainBatch, float]]:
        size, packing = self.optim_cfg.micro_batch_size, self.optim_cfg.packing
        parts = deal_groups(batch, self.world)
        counts = [len(micro_batches(p, size, packing)) if p is not None else 0 for p in parts]
        mine = micro_batches(parts[self.rank], size, packing) if parts[self.rank] is not None else []
        padding = micro_batches(batch, size)[0]  # any real micro-batch: its scale 0 makes it weightless
        # FSDP averages gradients over ranks, and each rank's loss is its share of the whole batch's (the
        # normalisers are global): scaling by the rank count makes the average the sum, as one process has
        # it (gloo cannot pre-scale its reduce-scatter, so the divide factor stays as it is)
        scale = float(self.world)
        return [(mb, scale) for mb in mine] + [(padding, 0.0)] * (max(counts) - len(mine))

    def combine(self, metrics: dict[str, float], rows: dict[str, list]) -> tuple[dict[str, float], dict]:
        local = (metrics, {k: torch.cat(v).cpu() if v else None for k, v in rows.items()})
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, local)
        total: dict[str, float] = {}
        for part, _ in gathered:
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        joined = {}
        for key in rows:
            pieces = [r[key] for _, r in gathered if r[key] is not None]
            joined[key] = torch.cat(pieces) if pieces else None
        return total, joined

    def clip_gradients(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class _Scorer(torch.nn.Module):
    """The FSDP root: its forward is the learner's scoring pass (log-probs, and entropy when asked)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, temperature, positions, entropy: bool):
        return score_tokens(self.model, input_ids, attention_mask, temperature, positions, entropy)


class _StateHolder(torch.nn.Module):
    """Lets `publishable_weights` (which reads a module's state dict) take a gathered state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._held = state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self._held


def _part() -> None:
    """Every gloo rank meets once after "stop" before any leaves the group: rank 0 destroying the group while
    a follower still receives that broadcast can abort the process ("terminate called without an active
    exception", seen once in CI). A rank that is gone is waited for PARTING_TIMEOUT at most, and is no error
    here: the run's work is done and saved by then."""
    if dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):
            dist.monitored_barrier(timeout=PARTING_TIMEOUT)
