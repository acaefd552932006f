"""Resolve a model name to a (model, tokenizer) pair: the tiny built-ins or a local transformers folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from asympo.errors import UserError
from asympo.models.tiny import TinyModelConfig, build_model, build_tokenizer

BUILTIN_TINY = Path(__file__).resolve().parent.parent / "assets" / "tiny-sft"


def cache_dir() -> Path:
    return Path(os.environ.get("ASYMPO_HOME", Path.home() / ".cache" / "asympo"))


def tiny_checkpoint() -> Path | None:
    """The warm-started tiny model: shipped with the package, or made earlier by `asympo sft`."""
    for path in (BUILTIN_TINY, cache_dir() / "tiny-sft"):
        if (path / "config.json").exists():
            return path
    return None


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer picks the tokenizer class from the model type (Qwen2 -> Qwen2Tokenizer), which would
    re-split our character-level vocabulary; a plain tokenizers-backed tokenizer is loaded as itself."""
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_folder(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {path}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_policy(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name == "tiny":
        path = tiny_checkpoint()
        if path is None:
            from asympo.config import SFTConfig
            from asympo.sft import run_sft

            print("No warm-started tiny model yet: running `asympo sft` first (a few minutes, once).")
            path = cache_dir() / "tiny-sft"
            run_sft(SFTConfig(out=str(path)))
        return load_folder(path)
    if name == "tiny-random":
        tokenizer = build_tokenizer()
        return build_model(TinyModelConfig(), tokenizer), tokenizer
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"model '{name}' is not 'tiny', 'tiny-random' or a local model folder")
    return load_folder(path)
