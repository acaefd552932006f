"""Turn a question into the prompt text a model sees: template, system prompt, few-shot examples, and
the tokenizer's chat template when the model has one."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from asympo.config import PromptConfig
from asympo.errors import UserError


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
