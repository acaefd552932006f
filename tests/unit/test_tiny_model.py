from __future__ import annotations

import torch

from asympo.models.load import load_folder
from asympo.models.tiny import CHARS


def test_tokenizer_is_character_level_and_round_trips(tokenizer):
    text = "12+34-5=42 What is 7?\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert len(set(tokenizer(CHARS, add_special_tokens=False)["input_ids"])) == len(set(CHARS))
    assert tokenizer.unk_token_id not in tokenizer(CHARS, add_special_tokens=False)["input_ids"]


def test_save_and_reload_with_standard_transformers_calls(tmp_path, small_model, tokenizer):
    small_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model2, tok2 = load_folder(tmp_path)  # AutoModelForCausalLM / from_pretrained underneath
    text = "99-12+3= 90"
    assert (
        tok2(text, add_special_tokens=False)["input_ids"]
        == tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    assert tok2.decode(tok2(text, add_special_tokens=False)["input_ids"]) == text
    assert (tok2.eos_token_id, tok2.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    torch.testing.assert_close(model2(ids).logits, small_model(ids).logits)
