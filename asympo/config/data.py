"""Where problems come from (`task`) and how a question becomes the prompt a model sees (`prompt`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from asympo.config.base import Strict


class TaskConfig(Strict):
    """Where problems come from: the built-in arithmetic (`12+34-56=`) or a dataset of question/answer rows.
    Dataset fields are ignored by arith and arith fields by datasets."""

    name: str = "arith"
    """`arith` (the built-in arithmetic), a `.jsonl` / `.json` / `.parquet` file, a dataset folder, a hub
    dataset id (`org/name`), or `reasoning_gym:<dataset>` (a reasoning-gym task: the `reasoning-gym`
    extra)."""
    options: dict[str, Any] = {}
    """reasoning-gym: the dataset's config keys, e.g. `task.options.min_terms=2`."""
    size: int = Field(4000, ge=10)
    """reasoning-gym: problems generated with `seed`; test and validation are held out of them by a hash of
    the question, the rest is the train set."""
    operands: int = Field(2, ge=2, le=8)
    """Arith: numbers per problem (2 to 8)."""
    digits: int = Field(2, ge=1, le=6)
    """Arith: digits per number (1 to 6)."""
    ops: str = "+"
    """Arith: the operators to draw from, a non-empty subset of `+-`."""
    subset: str | None = None
    """Datasets: the hub config name, e.g. `main` for `openai/gsm8k`."""
    split: str = "train"
    """Datasets: the split to train on (hub ids and folders)."""
    test: str = ""
    """Datasets: the held-out split or file; empty holds out 1 row in 10, chosen by a hash of its question."""
    question_field: str = "question"
    """Datasets: the field holding the question."""
    answer_field: str = "answer"
    """Datasets: the field holding the reference answer."""
    answer_format: Literal["plain", "gsm8k", "boxed"] = "plain"
    """How to read the reference answer: `plain` (as is), `gsm8k` (the number after `####`) or `boxed`
    (the last `\\boxed{}`)."""
    skip_bad_rows: bool = False
    """Datasets: skip and count bad rows instead of stopping at the first one (named by file and line)."""
    test_size: int = Field(200, ge=1)
    """Held-out problems to evaluate on (datasets: at most this many)."""
    validation_size: int = Field(0, ge=0)
    """> 0: also hold out this many validation problems (a second hash bucket, never trained on), scored
    after training; studies choose hyper-parameters on them so that the test set is never used to choose."""
    seed: int = 1234
    """Fixes arith's held-out sets; with the run's seed it also orders the train stream (datasets: each
    epoch's order)."""

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: str) -> str:
        if not v or set(v) - set("+-"):
            raise ValueError(f"ops must be a non-empty subset of '+-', got {v!r}")
        return v


class FewShot(Strict):
    """One worked example shown to the model before the question (`prompt.fewshot`)."""

    question: str
    """The example's question, formatted by the same template as the real one."""
    response: str
    """The full worked answer shown to the model, e.g. ending in `\\boxed{47}`."""


class PromptConfig(Strict):
    """`{question}` in the template is the problem text; `{expression}` is the same without a trailing '='
    (handy for the arithmetic task: 'What is {expression}?'). Braces are otherwise literal: \\boxed{}."""

    template: str = "{question}"
    """The user message: `{question}` is the problem text, `{expression}` the same without a trailing `=`;
    other braces are literal."""
    system: str | None = None
    """A system prompt; null: no system message."""
    fewshot: list[FewShot] = []
    """Worked examples (`question`, `response`) shown before the question (chat: as earlier turns)."""
    chat: Literal["auto", "on", "off"] = "auto"
    """Use the tokenizer's chat template: `auto` (when it has one), `on` or `off` (plain text). Quote on/off
    (`"off"`): YAML reads them bare as booleans."""

    @field_validator("template")
    @classmethod
    def _has_question(cls, template: str) -> str:
        if "{question}" not in template and "{expression}" not in template:
            raise ValueError("the template must contain {question} or {expression}")
        return template
