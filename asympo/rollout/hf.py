"""In-process transformers engine: continuous batching with a KV cache; finished sequences free their slot."""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from asympo.config import SamplingConfig
from asympo.rollout.base import Continuation, Refresh, Sample
from asympo.rollout.batching import PrefillStash, Prompt, SlotCache
from asympo.rollout.packed import PackedLinears
from asympo.rollout.stops import StopWatch

# Called after each decode step with the sequences that drew a token, those tokens, and the logits they were
# drawn from (banned tokens masked, before temperature); returns the sequences to end now, like EOS (a stop
# string, a client gone). The server's hook for stop strings, log-probs and streaming (asympo.serve.batcher).
StepWatch = Callable[[list[int], torch.Tensor, torch.Tensor], Collection[int]]

# Once no prompt is waiting, finished rows leave the batch when they are this share of it: each compaction
# copies the cache, each finished row left in costs a row of compute per step.
COMPACT_FRACTION = 1 / 8


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return it and its log-prob under the (temperature-scaled) policy."""
    logits = logits.float()
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    if sampling.temperature != 1:
        logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        logprobs = torch.log_softmax(logits, -1)
        probs = logprobs.exp()
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # keep the smallest nucleus
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        tokens = draw(probs, generator)
        return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
    # No nucleus: draw from exp(logits - max) as it is, and take the log-prob from the same weights' sum, so
    # that no full-vocabulary log-softmax, normalisation or float64 copy is made.
    peak = logits.amax(-1, keepdim=True)
    weights = (logits - peak).exp_()
    tokens, total = draw(weights, generator, with_total=True)
    picked = logits.gather(-1, tokens[:, None]) - peak
    return tokens, (picked[:, 0].double() - total.log()).float()


@functools.cache
def block_size(vocab: int) -> int:
    """A divisor of `vocab` near its square root (49152: 256): `draw` sums blocks of this many entries."""
    small = max(d for d in range(1, math.isqrt(vocab) + 1) if vocab % d == 0)
    return vocab // small


def draw(
    probs: torch.Tensor, generator: torch.Generator | None, with_total: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One token per row, with probability proportional to `probs` (non-negative weights), by inverting the
    CDF at one uniform draw per row; `with_total` also returns each row's sum of weights (float64).

    `torch.multinomial` draws one exponential per vocabulary entry (49k entries at batch 32: ~20 ms, 10-15%
    of a SmolLM2 rollout on CPU); this draws one number per row. The CDF is taken in two levels, both summed
    in float64: over blocks of about sqrt(vocab) entries (block sums accumulated in float64 from the float32
    weights), then within the block the draw fell in. That is the full float64 CDF up to rounding, without a
    float64 copy and cumulative sum of the whole vocabulary. Each level's draw stays strictly below its
    total, so a token of weight 0 (banned, outside the nucleus) is never picked.
    """
    rows, vocab = probs.shape
    block = block_size(vocab)
    blocks = probs.contiguous().view(rows, vocab // block, block)
    sums = blocks.sum(-1, dtype=torch.float64)
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    # drawn on the generator's device (the CPU), so a seed gives the same draws whatever device decodes
    u = torch.rand(total.shape, dtype=torch.float64, generator=generator).to(cdf.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    which = torch.searchsorted(cdf, u, right=True)  # the block: cdf[which - 1] <= u < cdf[which]
    before = torch.where(which > 0, cdf.gather(-1, (which - 1).clamp_min(0)), torch.zeros_like(u))
    inner = blocks[torch.arange(rows, device=probs.device), which[:, 0]].double().cumsum(-1)
    rest = torch.minimum(u - before, torch.nextafter(inner[:, -1:], torch.zeros_like(total)))
    tokens = which[:, 0] * block + torch.searchsorted(inner, rest, right=True)[:, 0]
    return (tokens, total[:, 0]) if with_total else tokens


class HFEngine:
    """Generates with its own copy of the policy, at whichever version the runtime loaded into it.

    It runs on the model's device, in the model's dtype: a bf16 copy keeps a bf16 KV cache (see
    asympo.models.device.for_engine); logits are sampled in float32."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        version: int = 0,
        return_logprobs: bool = True,
        max_batch: int = 64,
        inflight_kv: str = "keep",
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_batch = max_batch  # live sequences at once; more prompts wait for a free slot
        self.return_logprobs = return_logprobs  # off: samples carry ids, text and version only
        # In-flight weight updates: `keep` the keys/values live sequences computed under older weights, or
        # `recompute` them (re-prefill every live sequence under the new weights).
        self.inflight_kv = inflight_kv
        # (version, wall time of its first token drawn) per generate call; the async workers drain it
        self.first_tokens: deque[tuple[int, float]] = deque(maxlen=256)
        # transformers 5 renamed `past_key_values` to `cache`; accept both so older releases work too.
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.tokenizer = tokenizer
        self.version = version
        self.eos_id = tokenizer.eos_token_id
        # Fills left padding and finished slots; never attended to, so any valid id does.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, self.eos_id) if i is not None), 0)
        # A barely trained model happily samples special tokens; only EOS may end a response.
        self.banned = [
            i
            for i in {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
            if i is not None and i != self.eos_id
        ]
        # bf16 on the CPU: linear layers multiply with weights reordered once, not on every call (packed.py)
        self.packed = PackedLinears(model, rows_hint=max_batch)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict, strict=False)
        self.version = version

    def generate(
        self,
        prompts: list[str],
        n: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        refresh: Refresh | None = None,
    ) -> list[list[Sample]]:
        """`n` samples per prompt. With `refresh`, newer weights are loaded between decode steps and a
        response may span versions: each sample records the version of every token."""
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        flat = [ids for ids in prompt_ids for _ in range(n)]
        outs = self.continue_ids(flat, sampling, generator, refresh=refresh)
        groups = []
        for g, prompt in enumerate(prompts):
            group = []
            for j in range(g * n, (g + 1) * n):
                out = outs[j]
                oldest = min(out.versions, default=self.version)
                group.append(
                    Sample(
                        prompt=prompt,
                        prompt_ids=flat[j],
                        response_ids=out.ids,
                        text=self.tokenizer.decode(out.ids, skip_special_tokens=True),
                        finish_reason=out.finish_reason,
                        version=oldest,
                        behaviour_logprobs=out.logprobs if self.return_logprobs else None,
                        group=g,
                        token_versions=out.versions if any(v != oldest for v in out.versions) else None,
                        version_end=out.version_end,
                    )
                )
            groups.append(group)
        return groups

    def continue_ids(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        stops: Sequence[str] = (),
        budgets: list[int] | None = None,
        refresh: Refresh | None = None,
    ) -> list[Continuation]:
        """One continuation per token sequence, with each token's version (what multi-turn episodes call):
        it ends at EOS, at one of `stops` (kept) or after its `budgets` entry of tokens (`length`)."""
        watch = None
        if stops or budgets is not None:
            watch = StopWatch(self.tokenizer, stops, budgets or [sampling.max_new_tokens] * len(prompts))
        with torch.inference_mode(), self.packed.active():
            got = self._generate_ids(prompts, sampling, generator, watch, refresh)
        outs = [Continuation(*fields) for fields in zip(*got, strict=True)]
        for i in watch.cut if watch is not None else ():
            if outs[i].ids[-1] != self.eos_id:
                outs[i].finish_reason = "length"
        return outs

    def generate_ids(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        watch: StepWatch | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Token-level generation, continuously batched over at most `max_batch` slots.

        A sequence that ends (EOS or `max_new_tokens`) frees its slot and the next waiting prompt takes it at
        the next step, so the batch stays full instead of running until its slowest sequence ends. Prompts
        are prefilled a batch at a time, ahead of need, and each distinct prompt once (see `PrefillStash`).
        Deterministic given the prompts, `max_batch` and the generator's state; `watch` may end some early.
        """
        with torch.inference_mode(), self.packed.active():
            return self._generate_ids(prompts, sampling, generator, watch)[:3]

    def _generate_ids(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        watch: StepWatch | None,
        refresh: Refresh | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[str], list[list[int]], list[int]]:
        """Also returns each token's version and the version each sequence finished under."""
        prompts = [tuple(p) for p in prompts]
        total = len(prompts)
        responses: list[list[int]] = [[] for _ in range(total)]
        logprobs: list[list[float]] = [[] for _ in range(total)]
        versions: list[list[int]] = [[] for _ in range(total)]
        ends = [self.version] * total
        reasons = ["length"] * total
        first_of_version = True
        num_slots = min(self.max_batch, total)
        compact_at = max(1, round(num_slots * COMPACT_FRACTION))
        device = self.device
        slots = SlotCache(num_slots, room=min(sampling.max_new_tokens, 64), device=device)
        owner = [-1] * num_slots  # the sequence each slot serves, -1 when free
        positions = torch.zeros(num_slots, dtype=torch.long, device=device)  # each slot's next position id
        logits: torch.Tensor | None = None  # each slot's next-token logits
        started = 0  # prompts[started:] are waiting
        stash = PrefillStash(prompts)
        while True:
            free = [s for s, seq in enumerate(owner) if seq < 0]
            if started < total and free:
                newcomers = range(started, min(total, started + len(free)))
                if any(prompts[i] not in stash.entries for i in newcomers):  # prefill up to a batch ahead
                    self._prefill(
                        stash.missing(prompts[started : started + max(len(free), num_slots)]), stash
                    )
                taking: dict[Prompt, list[int]] = {}  # the free slots each distinct prompt takes
                for s, seq in zip(free, newcomers, strict=False):
                    taking.setdefault(prompts[seq], []).append(s)
                    owner[s] = seq
                for prompt, into in taking.items():
                    cache, first_logits = stash.take(prompt, len(into))
                    slots.insert(torch.tensor(into, device=device), cache)
                    if logits is None:
                        logits = first_logits.new_empty(num_slots, len(first_logits))
                    logits[into] = first_logits
                    positions[into] = len(prompt)
                started = newcomers.stop
            active = [s for s, seq in enumerate(owner) if seq >= 0]
            if not active:
                return responses, logprobs, reasons, versions, ends
            index = torch.tensor(active, device=device)
            tokens, token_lp = sample_tokens(logits[index], sampling, generator)
            if first_of_version:  # publish-to-use latency: when a version's first token was drawn
                self.first_tokens.append((self.version, time.time()))
                first_of_version = False
            ended = watch([owner[s] for s in active], tokens, logits[index]) if watch is not None else ()
            finished = []
            for s, token, lp in zip(active, tokens.tolist(), token_lp.tolist(), strict=True):
                seq = owner[s]
                responses[seq].append(token)
                logprobs[seq].append(lp)
                versions[seq].append(self.version)  # every slot's logits came from the weights loaded now
                if token == self.eos_id or seq in ended:
                    reasons[seq] = "stop"
                elif len(responses[seq]) < sampling.max_new_tokens:
                    continue
                ends[seq] = self.version
                finished.append(s)
                owner[s] = -1
            slots.retire(finished)
            if len(finished) == len(active) and started == total:
                return responses, logprobs, reasons, versions, ends
            step_tokens = torch.full((len(owner),), self.pad_id, device=device).index_copy_(0, index, tokens)
            if started == total and len(finished) and owner.count(-1) >= compact_at:
                keep = torch.tensor([s for s, seq in enumerate(owner) if seq >= 0], device=device)
                slots.select(keep)  # nothing left to refill with: stop computing finished rows
                owner = [owner[s] for s in keep.tolist()]
                positions, step_tokens = positions[keep], step_tokens[keep]
            if refresh is not None and refresh():  # newer weights, loaded between two decode steps
                first_of_version = True
                stash.entries.clear()  # prompts prefilled under the old weights are prefilled again
                if self.inflight_kv == "recompute":
                    logits = self._recompute(slots, owner, prompts, responses, positions, logits)
                    continue
            out = self.model(
                input_ids=step_tokens[:, None],
                attention_mask=slots.open_column(),
                position_ids=positions[:, None],
                use_cache=True,
                **{self.cache_kwarg: slots.cache},
            )
            slots.advance()
            positions += 1
            logits = self._mask_banned(out.logits[:, -1])

    def _recompute(
        self,
        slots: SlotCache,
        owner: list[int],
        prompts: list[Prompt],
        responses: list[list[int]],
        positions: torch.Tensor,
        logits: torch.Tensor,
    ) -> torch.Tensor:
        """AReaL's choice after a weight update: every live sequence (prompt and response so far, the token
        just drawn included) is prefilled again under the new weights and takes its slot afresh, so no key or
        value computed by older weights is attended to again. Returns the slots' next-token logits."""
        live = [s for s, seq in enumerate(owner) if seq >= 0]
        full = [prompts[owner[s]] + tuple(responses[owner[s]]) for s in live]
        stash = PrefillStash(full)
        self._prefill(stash.missing(full), stash)
        logits = logits.new_zeros(len(owner), logits.shape[-1])  # the rows of free slots are never drawn from
        for s, sequence in zip(live, full, strict=True):
            cache, next_logits = stash.take(sequence, 1)
            slots.insert(torch.tensor([s], device=self.device), cache)
            logits[s] = next_logits
            positions[s] = len(sequence)
        return logits

    def _prefill(self, prompts: list[Prompt], stash: PrefillStash) -> None:
        """Run the prompts in one left-padded batch and keep their caches and next-token logits in `stash`."""
        if not prompts:
            return
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device
        )
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        cache = DynamicCache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: cache},
        )
        stash.add(prompts, cache, self._mask_banned(out.logits[:, -1]))

    def _mask_banned(self, logits: torch.Tensor) -> torch.Tensor:
        if self.banned:
            logits[:, self.banned] = float("-inf")
        return logits
