"""Turn a question into the prompt text a model sees: template, system prompt, few-shot examples, and
the tokenizer's chat template when the model has one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator
from transformers import PreTrainedTokenizerBase

from asympo.errors import UserError


class FewShot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    response: str  # the full worked answer shown to the model, e.g. ending in \boxed{47}


class PromptConfig(BaseModel):
    """`{question}` in the template is the problem text; `{expression}` is the same without a trailing '='
    (handy for the arithmetic task: 'What is {expression}?'). Braces are otherwise literal: \\boxed{}."""

    model_config = ConfigDict(extra="forbid")

    template: str = "{question}"
    system: str | None = None
    fewshot: list[FewShot] = []
    chat: Literal["auto", "on", "off"] = "auto"  # auto: the chat template when the tokenizer has one

    @field_validator("template")
    @classmethod
    def _has_question(cls, template: str) -> str:
        if "{question}" not in template and "{expression}" not in template:
            raise ValueError("the template must contain {question} or {expression}")
        return template


class Prompter:
    def __init__(self, cfg: PromptConfig, tokenizer: PreTrainedTokenizerBase):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.chat == "on" and not has_template:
            raise UserError("prompt.chat=on, but this model's tokenizer has no chat template")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.chat = cfg.chat == "on" or (cfg.chat == "auto" and has_template)

    def user_text(self, question: str) -> str:
        expression = question.strip().removesuffix("=").strip()
        return self.cfg.template.replace("{question}", question).replace("{expression}", expression)

    def __call__(self, question: str) -> str:
        cfg = self.cfg
        if not self.chat:
            shots = [self.user_text(s.question) + s.response for s in cfg.fewshot]
            return "\n\n".join([*([cfg.system] if cfg.system else []), *shots, self.user_text(question)])
        messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
        for shot in cfg.fewshot:
            messages += [
                {"role": "user", "content": self.user_text(shot.question)},
                {"role": "assistant", "content": shot.response},
            ]
        messages.append({"role": "user", "content": self.user_text(question)})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
