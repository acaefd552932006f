"""Log-probs as OpenAI clients read them: per token, its log-prob and the `top` most likely alternatives.

Every figure is a float32 log-softmax of the served model's logits (the logits themselves in the model's
precision), over the raw distribution: no temperature, no nucleus, as vLLM reports by default. Generated
tokens are scored from the logits they were drawn from; prompt tokens (`echo`) by one forward pass of the
prompt, the head applied a slice of positions at a time so a long prompt never holds its whole
`positions x vocab` logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

HEAD_CHUNK = 256  # positions whose logits exist at once while scoring a prompt
MAX_TOP = 20  # OpenAI's ceiling for `logprobs` (completions) and `top_logprobs` (chat)


@dataclass
class TokenScores:
    """One sequence's tokens with, per token, its log-prob (None: the first prompt token has no context)
    and its `top` alternatives as (token id, log-prob), most likely first."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def extend(self, other: TokenScores) -> None:
        self.ids += other.ids
        self.logprobs += other.logprobs
        self.tops += other.tops

    def head(self, count: int) -> TokenScores:
        return TokenScores(self.ids[:count], self.logprobs[:count], self.tops[:count])


def rows(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[list[float], list[list]]:
    """Log-probs of `tokens` under each row of `logits`, and each row's `top` best (id, log-prob)."""
    logprobs = torch.log_softmax(logits.float(), -1)
    picked = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top == 0:
        return picked, [[] for _ in picked]
    values, ids = logprobs.topk(top, -1)
    best = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return picked, best


@torch.inference_mode()
def score_prompt(model: PreTrainedModel, ids: list[int], top: int) -> TokenScores:
    """Each prompt token's log-prob given the tokens before it (the first: None), in one forward pass."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:  # an architecture without the split: the whole logits at once
        hidden, head = None, None
        logits = model(input_ids=input_ids).logits[0]
    else:
        hidden = decoder(input_ids=input_ids).last_hidden_state[0]
    scores = TokenScores(list(ids), [None], [None])
    targets = torch.tensor(ids[1:], device=device)
    for start in range(0, len(ids) - 1, HEAD_CHUNK):
        stop = min(start + HEAD_CHUNK, len(ids) - 1)
        chunk = head(hidden[start:stop]) if head is not None else logits[start:stop]
        picked, best = rows(chunk, targets[start:stop], top)
        scores.logprobs += picked
        scores.tops += best
    return scores


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Each token's own text, as the `tokens` and `top_logprobs` keys show it."""
    return [tokenizer.decode([i]) for i in ids]


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, scores: TokenScores, top: int, offset: int = 0
) -> dict:
    """The `/v1/completions` shape: parallel lists of tokens, their log-probs, the `top` alternatives (the
    chosen token always among them) and each token's character offset in the returned text."""
    texts = token_texts(tokenizer, scores.ids)
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    tops: list[dict[str, float] | None] = []
    for text, lp, best in zip(texts, scores.logprobs, scores.tops, strict=True):
        if best is None or lp is None:
            tops.append(None)
            continue
        shown = {tokenizer.decode([i]): v for i, v in best[:top]}
        shown.setdefault(text, lp)
        tops.append(shown)
    return {"tokens": texts, "token_logprobs": scores.logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, scores: TokenScores, top: int) -> dict:
    """The `/v1/chat/completions` shape: `content`, one item per token with its bytes and alternatives."""

    def item(token_id: int, lp: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}

    content = []
    for token_id, lp, best in zip(scores.ids, scores.logprobs, scores.tops, strict=True):
        entry = item(token_id, lp if lp is not None else 0.0)
        entry["top_logprobs"] = [item(i, v) for i, v in (best or [])[:top]]
        content.append(entry)
    return {"content": content}
