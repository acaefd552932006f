"""Turn rewarded samples into padded training tensors with group-relative advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asympo.advantages import group_advantages
from asympo.rollout.base import Sample


@dataclass
class TrainBatch:
    """Right-padded prompt+response sequences. Token tensors are shifted: column t scores token t+1."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    response_mask: torch.Tensor  # [B, L-1] bool: True where the scored token is a response token
    advantages: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B]
    versions: torch.Tensor  # [B] policy version that generated each response
    behaviour_logprobs: torch.Tensor | None  # [B, L-1], zeros outside the response

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> TrainBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TrainBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def select(self, rows: torch.Tensor) -> TrainBatch:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TrainBatch(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))

    def trimmed(self) -> TrainBatch:
        """Without the padding columns every row has (right padding past the longest sequence)."""
        width = int(self.attention_mask.sum(-1).max())
        if width == self.input_ids.shape[1]:
            return self
        shifted = lambda t: None if t is None else t[:, : width - 1]  # noqa: E731
        return TrainBatch(
            input_ids=self.input_ids[:, :width],
            attention_mask=self.attention_mask[:, :width],
            response_mask=shifted(self.response_mask),
            advantages=self.advantages,
            rewards=self.rewards,
            group_ids=self.group_ids,
            versions=self.versions,
            behaviour_logprobs=shifted(self.behaviour_logprobs),
        )


def make_batch(samples: list[Sample], pad_id: int, advantage: str) -> TrainBatch:
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    rows = len(samples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros(rows, width, dtype=torch.long)
    response_mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    has_behaviour = all(s.behaviour_logprobs is not None for s in samples)
    behaviour = torch.zeros(rows, width - 1) if has_behaviour else None
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[i, : p + r] = 1
        # a multi-turn episode's response also holds the environment's replies: the loss covers the model's
        mask = True if s.model_mask is None else torch.tensor(s.model_mask, dtype=torch.bool)
        response_mask[i, p - 1 : p - 1 + r] = mask
        if behaviour is not None:
            behaviour[i, p - 1 : p - 1 + r] = torch.tensor(s.behaviour_logprobs)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    group_ids = torch.tensor([s.group for s in samples])
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        advantages=group_advantages(rewards, group_ids, advantage),
        rewards=rewards,
        group_ids=group_ids,
        versions=torch.tensor([s.version for s in samples]),
        behaviour_logprobs=behaviour,
    )


def micro_batches(batch: TrainBatch, size: int, packing: str = "none") -> list[TrainBatch]:
    """Split into micro-batches of about `size` responses without ever splitting a group, each cut to its own
    longest sequence; `sorted` and `packed` take the groups longest first, so similar lengths share one."""
    lengths = batch.attention_mask.sum(-1)
    groups = [
        (batch.group_ids == gid).nonzero()[:, 0].tolist() for gid in batch.group_ids.unique(sorted=True)
    ]
    if packing in ("sorted", "packed"):
        groups.sort(key=lambda rows: -int(lengths[rows].max()))  # stable: ties keep batch order
    chunks: list[list[int]] = [[]]
    for rows in groups:
        if chunks[-1] and len(chunks[-1]) + len(rows) > size:
            chunks.append([])
        chunks[-1].extend(rows)
    return [batch.select(torch.tensor(c)).trimmed() for c in chunks]


@dataclass
class Packed:
    """A micro-batch with several sequences per row (`optim.packing=packed`): each row holds whole
    sequences back to back, positions restart at each one, and attention stays inside each (a block-diagonal
    causal mask). Scores come back in the micro-batch's own [B, L-1] layout (`unpack`)."""

    input_ids: torch.Tensor  # [R, C]
    position_ids: torch.Tensor  # [R, C]
    attention_mask: torch.Tensor  # [R, 1, C, C] bool: query attends key
    positions: torch.Tensor  # [R, C-1] bool: the scored columns (the micro-batch's response_mask, moved)
    rows: torch.Tensor  # the micro-batch row of each scored column, in positions.nonzero() order
    cols: torch.Tensor  # and its column there
    shape: tuple[int, int]  # the micro-batch's [B, L-1]

    def to(self, device: torch.device) -> Packed:
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Packed(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def unpack(self, scores: torch.Tensor) -> torch.Tensor:
        out = scores.new_zeros(self.shape)
        out[self.rows, self.cols] = scores[self.positions]
        return out


ROW_SPAN = 2  # a packed row holds up to twice the longest sequence: attention's cost grows with the row,
# the rest (most of a small model's) with the tokens, so a longer row packs more and costs little more


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Sequences into rows of `ROW_SPAN` times the longest, first fit by decreasing length: [[index, ...]]."""
    capacity = ROW_SPAN * max(lengths)
    bins: list[list[int]] = []
    free: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        fits = next((i for i, room in enumerate(free) if lengths[b] <= room), None)
        if fits is None:
            bins.append([b])
            free.append(capacity - lengths[b])
        else:
            bins[fits].append(b)
            free[fits] -= lengths[b]
    return bins


def pack(mb: TrainBatch) -> Packed:
    lengths = mb.attention_mask.sum(-1).tolist()
    bins = pack_rows(lengths)
    width = max(sum(lengths[b] for b in row) for row in bins)
    input_ids = torch.zeros(len(bins), width, dtype=mb.input_ids.dtype)
    position_ids = torch.zeros(len(bins), width, dtype=torch.long)
    segment = torch.full((len(bins), width), -1)
    positions = torch.zeros(len(bins), width - 1, dtype=torch.bool)
    rows, cols = [], []
    for r, members in enumerate(bins):
        offset = 0
        for b in members:
            n = lengths[b]
            input_ids[r, offset : offset + n] = mb.input_ids[b, :n]
            position_ids[r, offset : offset + n] = torch.arange(n)
            segment[r, offset : offset + n] = b
            scored = mb.response_mask[b, : n - 1].nonzero()[:, 0]
            positions[r, offset + scored] = True
            rows.append(torch.full_like(scored, b))
            cols.append(scored)
            offset += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    # a padding column attends to itself only: no row of the mask is empty (an empty one gives NaN)
    alone = (segment < 0)[:, :, None] & torch.eye(width, dtype=torch.bool)
    mask = (same & (segment >= 0)[:, :, None] & causal) | alone
    return Packed(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask[:, None],
        positions=positions,
        rows=torch.cat(rows),
        cols=torch.cat(cols),
        shape=tuple(mb.response_mask.shape),
    )


# Pack a micro-batch only when that runs at most this share of its padded tokens: the mask costs attention
# its fast causal kernel, which a little padding does not pay for (measured: docs/performance.md).
PACK_GAIN = 0.8


def packed_tokens(mb: TrainBatch) -> int:
    lengths = mb.attention_mask.sum(-1).tolist()
    bins = pack_rows(lengths)
    return len(bins) * max(sum(lengths[b] for b in row) for row in bins)


def worth_packing(mb: TrainBatch) -> bool:
    return packed_tokens(mb) <= PACK_GAIN * mb.attention_mask.numel()


def computed_tokens(mb: TrainBatch, packing: str) -> int:
    """Token positions the model runs for a micro-batch: padded rows, or packed ones where that pays."""
    if packing == "packed" and worth_packing(mb):
        return packed_tokens(mb)
    return mb.attention_mask.numel()


def minibatches(batch: TrainBatch, count: int) -> list[TrainBatch]:
    """Split into `count` mini-batches of whole groups, as equal in groups as they can be, in group order;
    a batch of fewer groups (dynamic sampling can end short) gives one per group.

    Each is one optimiser update: its advantages are the batch's (computed over whole groups already)."""
    groups = batch.group_ids.unique(sorted=True).tolist()
    count = min(count, len(groups))
    if count <= 1:
        return [batch]
    parts = [groups[i * len(groups) // count : (i + 1) * len(groups) // count] for i in range(count)]
    return [batch.select(torch.isin(batch.group_ids, torch.tensor(part)).nonzero()[:, 0]) for part in parts]


def synthetic_batch(vocab: int, rows: int, length: int, seed: int = 0) -> TrainBatch:
    """`rows` sequences of `length` random tokens, a quarter prompt and the rest response, in groups of 4,
    with behaviour log-probs so the behaviour-corrected objectives run on the very same batch."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    response_mask = torch.zeros(rows, length - 1, dtype=torch.bool)
    response_mask[:, length // 4 - 1 :] = True
    advantages = torch.randn(rows, generator=g)
    behaviour = torch.where(response_mask, -torch.rand(rows, length - 1, generator=g) - 10.0, 0.0)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        response_mask=response_mask,
        advantages=advantages,
        rewards=torch.zeros(rows),
        group_ids=torch.arange(rows) // 4,
        versions=torch.zeros(rows, dtype=torch.long),
        behaviour_logprobs=behaviour,
    )
