"""Continuous batching helpers: a slot-based KV cache built on transformers' `Cache` API, and a stash that
prefills each distinct prompt once.

Why not `DynamicCache`: it appends each decode step's keys and values with `torch.cat`, which allocates and
copies the whole cache once per token; on CPU that copy cost about as much as the matmuls (40% of a SmolLM2
decode step at batch 32). Here each layer's keys and values live in buffers
`[slots, kv_heads, capacity, head_dim]` allocated once, and a decode step writes one column in place.

Layout: all slots share the write column `end`; each slot's tokens are right-aligned to it (left padding),
and a boolean mask `[slots, capacity]` says which columns a slot attends to. Positions are the engine's
business (per-slot position ids), so a column's index never has to match a token's position. A slot whose
sequence has finished is refilled by writing a newcomer's prefilled cache into columns `[end - length, end)`
and masking everything to its left: no other slot's cache is touched. When the columns run out, the live
window is copied back to the start of fresh buffers, once every `room` steps.

Every column a slot may read holds finite values (buffers start zeroed, finished slots keep being computed on
finite context), and every slot attends to at least its newest column, so no attention row is fully masked and
no NaN can leak through a masked column (0 * NaN would).
"""

from __future__ import annotations

from collections import Counter

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

Prompt = tuple[int, ...]
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, kv_heads, tokens, head_dim]


class BufferLayer(DynamicLayer):
    """A layer's cache: `keys`, `values` are views `[:, :, :end]` of buffers, `update` writes in place."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, end: int):
        super().__init__()
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.device = key_buffer.device
        self.is_initialized = True
        self.set_end(end)

    def set_end(self, end: int) -> None:
        self.end = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stop = self.end + key_states.shape[-2]
        self.key_buffer[:, :, self.end : stop] = key_states
        self.value_buffer[:, :, self.end : stop] = value_states
        self.set_end(stop)
        return self.keys, self.values


class SlotCache:
    """KV buffers and attention mask for a fixed set of slots (see the module docstring for the layout)."""

    def __init__(self, num_slots: int, room: int, device: torch.device | str = "cpu"):
        self.num_slots = num_slots
        self.room = max(room, 1)  # free columns left after a re-layout: decode steps until the next one
        self.end = 0
        self.live = torch.zeros(num_slots, dtype=torch.bool, device=device)  # slots serving a live sequence
        self.mask = torch.zeros(num_slots, 0, dtype=torch.bool, device=device)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache: Cache | None = None  # what the model's forward gets

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def insert(self, slots: torch.Tensor, prompt: KV) -> None:
        """Start `slots` on one prompt, given its prefilled cache (one row, no padding), which is copied into
        the columns that end at `end`."""
        length = prompt[0][0].shape[2]
        if not self.buffers:
            self._allocate(prompt, length)
        elif length > self.end:
            self._relayout(new_end=length)
        start = self.end - length
        self.live[slots] = True
        self.mask[slots] = False
        self.mask[slots, start : self.end] = True
        for (keys, values), (k, v) in zip(self.buffers, prompt, strict=True):
            keys[slots, :, start : self.end] = k
            values[slots, :, start : self.end] = v

    def retire(self, slots: list[int]) -> None:
        """These slots' sequences ended: their columns stop pinning the live window. The slots keep being
        computed until refilled, which is cheaper than compacting the batch at every finish."""
        self.live[slots] = False

    def open_column(self) -> torch.Tensor:
        """Make room for one more token in every slot; return the attention mask for the next decode step."""
        if self.end == self.capacity:
            self._relayout(new_end=0)
        self.mask[:, self.end] = True
        return self.mask[:, : self.end + 1]

    def advance(self) -> None:
        """The decode step has written column `end` in every layer."""
        self.end += 1

    def select(self, keep: torch.Tensor) -> None:
        """Keep only slots `keep`, in that order: shrinks the batch once no prompt is waiting."""
        self.num_slots = len(keep)
        self.live, self.mask = self.live[keep], self.mask[keep]
        self.buffers = [(k[keep], v[keep]) for k, v in self.buffers]
        self._rebuild_cache()

    def _allocate(self, like: KV, width: int) -> None:
        self.end = width
        self.mask = self.mask.new_zeros(self.num_slots, width + self.room)
        self.buffers = []
        for keys, values in like:
            shape = (self.num_slots, keys.shape[1], width + self.room, keys.shape[3])
            self.buffers.append((keys.new_zeros(shape), values.new_zeros(shape)))
        self._rebuild_cache()

    def _relayout(self, new_end: int) -> None:
        """Copy the live window (the columns live slots read) into fresh buffers so that it ends at column
        max(new_end, its width), with `room` free columns after it."""
        used = self.mask[self.live, : self.end].any(0).nonzero()
        first = int(used[0]) if len(used) else self.end
        width = self.end - first
        end = max(new_end, width)
        mask = self.mask.new_zeros(self.num_slots, end + self.room)
        mask[:, end - width : end] = self.mask[:, first : self.end]
        buffers = []
        for pair in self.buffers:
            fresh = []
            for old in pair:
                new = old.new_zeros(old.shape[0], old.shape[1], end + self.room, old.shape[3])
                new[:, :, end - width : end] = old[:, :, first : self.end]
                fresh.append(new)
            buffers.append((fresh[0], fresh[1]))
        self.mask, self.buffers, self.end = mask, buffers, end
        self._rebuild_cache()

    def _rebuild_cache(self) -> None:
        self.cache = Cache(layers=[BufferLayer(k, v, self.end) for k, v in self.buffers])


class PrefillStash:
    """Prefilled prompts, each kept until its last waiting copy has started.

    The n samples of a group share their prompt but take slots whenever slots free up, often in different
    refills; with the stash each distinct prompt is computed once.
    """

    def __init__(self, prompts: list[Prompt]):
        self.waiting = Counter(prompts)
        self.entries: dict[Prompt, tuple[KV, torch.Tensor]] = {}

    def missing(self, prompts: list[Prompt]) -> list[Prompt]:
        return [p for p in dict.fromkeys(prompts) if p not in self.entries]

    def add(self, prompts: list[Prompt], prefill: DynamicCache, logits: torch.Tensor) -> None:
        """Keep each row of a left-padded prefill (its cache without the padding, its next-token logits)."""
        for row, prompt in enumerate(prompts):
            cut = prefill.layers[0].keys.shape[2] - len(prompt)
            cache = [
                (layer.keys[row : row + 1, :, cut:], layer.values[row : row + 1, :, cut:])
                for layer in prefill.layers
            ]
            self.entries[prompt] = (cache, logits[row])

    def take(self, prompt: Prompt, copies: int) -> tuple[KV, torch.Tensor]:
        """Copies of `prompt` start: its cache and next-token logits."""
        entry = self.entries[prompt]
        self.waiting[prompt] -= copies
        if not self.waiting[prompt]:
            del self.entries[prompt]
        return entry
