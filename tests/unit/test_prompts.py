"""Prompt rendering: template placeholders, literal braces, few-shot, system prompt and chat templates."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from asympo.config import FewShot, PromptConfig
from asympo.data.prompts import Prompter
from asympo.errors import UserError

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SHOT = FewShot(question="12+35=", response="12 + 35 = 47, so \\boxed{47}.")


def test_default_prompt_is_the_question_itself(tokenizer):
    assert Prompter(PromptConfig(), tokenizer)("12+34=") == "12+34="


def test_template_placeholders_and_literal_braces(tokenizer):
    cfg = PromptConfig(template="What is {expression}? Answer in \\boxed{}. ({question})")
    assert Prompter(cfg, tokenizer)("12+34=") == "What is 12+34? Answer in \\boxed{}. (12+34=)"


def test_plain_few_shot_puts_system_then_examples_before_the_question(tokenizer):
    cfg = PromptConfig(template="Q: {expression}\nA: ", system="Add.", fewshot=[SHOT])
    assert (
        Prompter(cfg, tokenizer)("1+2=")
        == "Add.\n\nQ: 12+35\nA: 12 + 35 = 47, so \\boxed{47}.\n\nQ: 1+2\nA: "
    )


def test_chat_template_gets_system_few_shot_turns_and_a_generation_prompt(tokenizer):
    tokenizer.chat_template = CHAT
    try:
        cfg = PromptConfig(template="What is {expression}?", system="Be brief.", fewshot=[SHOT])
        text = Prompter(cfg, tokenizer)("1+2=")
        assert Prompter(cfg.model_copy(update={"chat": "off"}), tokenizer)("1+2=").startswith("Be brief.")
    finally:
        tokenizer.chat_template = None
    assert text == (
        "<|system|>Be brief.<|end|><|user|>What is 12+35?<|end|>"
        "<|assistant|>12 + 35 = 47, so \\boxed{47}.<|end|><|user|>What is 1+2?<|end|><|assistant|>"
    )


def test_chat_on_without_a_chat_template_and_a_template_without_the_question_are_errors(tokenizer):
    with pytest.raises(UserError, match="no chat template"):
        Prompter(PromptConfig(chat="on"), tokenizer)
    with pytest.raises(ValidationError, match="must contain"):
        PromptConfig(template="What is it?")
