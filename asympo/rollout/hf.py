"""In-process transformers engine: batched sampling with a KV cache; finished sequences leave the batch."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from asympo.rollout.base import Sample, SamplingConfig


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return it and its log-prob under the (temperature-scaled) policy."""
    logits = logits.float()
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logprobs = torch.log_softmax(logits / sampling.temperature, -1)
    probs = logprobs.exp()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # keep the smallest nucleus
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


class HFEngine:
    """Generates with its own copy of the policy, at whichever version the runtime loaded into it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        version: int = 0,
        return_logprobs: bool = True,
    ):
        self.model = model.eval()
        self.return_logprobs = return_logprobs  # off: samples carry ids, text and version only
        # transformers 5 renamed `past_key_values` to `cache`; accept both so older releases work too.
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.tokenizer = tokenizer
        self.version = version
        self.eos_id = tokenizer.eos_token_id
        # A barely trained model happily samples special tokens; only EOS may end a response.
        self.banned = [
            i
            for i in {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
            if i is not None and i != self.eos_id
        ]

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict, strict=False)
        self.version = version

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> list[list[Sample]]:
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        flat = [ids for ids in prompt_ids for _ in range(n)]
        responses, logprobs, reasons = self.generate_ids(flat, sampling, generator)
        groups = []
        for g, prompt in enumerate(prompts):
            group = []
            for j in range(g * n, (g + 1) * n):
                group.append(
                    Sample(
                        prompt=prompt,
                        prompt_ids=flat[j],
                        response_ids=responses[j],
                        text=self.tokenizer.decode(responses[j], skip_special_tokens=True),
                        finish_reason=reasons[j],
                        version=self.version,
                        behaviour_logprobs=logprobs[j] if self.return_logprobs else None,
                        group=g,
                    )
                )
            groups.append(group)
        return groups

    @torch.inference_mode()
    def generate_ids(
        self, prompts: list[list[int]], sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Token-level generation: left-padded prefill, then one decode step per token over the live rows."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: cache},
        )
        live = torch.arange(batch)  # original row of each live sequence
        next_pos = positions[:, -1] + 1
        responses: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        for step in range(sampling.max_new_tokens):
            logits = out.logits[:, -1]
            if self.banned:
                logits[:, self.banned] = float("-inf")
            tokens, token_lp = sample_tokens(logits, sampling, generator)
            done = torch.zeros(len(live), dtype=torch.bool)
            for k, (row, tok, lp) in enumerate(
                zip(live.tolist(), tokens.tolist(), token_lp.tolist(), strict=True)
            ):
                responses[row].append(tok)
                logprobs[row].append(lp)
                if tok == self.eos_id:
                    reasons[row] = "stop"
                    done[k] = True
            if done.all() or step == sampling.max_new_tokens - 1:
                break
            if done.any():  # finished sequences leave the batch, cache included
                keep = (~done).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                live, tokens, attention, next_pos = live[keep], tokens[keep], attention[keep], next_pos[keep]
            attention = torch.cat([attention, torch.ones(len(live), 1, dtype=attention.dtype)], dim=1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
            next_pos = next_pos + 1
        return responses, logprobs, reasons
