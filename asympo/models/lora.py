"""LoRA through peft (`lora.rank > 0`): the learner trains low-rank adapters on a frozen base.

`peft.get_peft_model` injects the adapter layers into the model in place, so the learner keeps training
the very model object it was given (its forward, autocast and checkpointing stay as they are). Engines
never see adapter layers: they get merged weights under the plain parameter names (`merged_weights`,
through `publishable_weights`), except Ray actors, which wrap their own copy the same way and receive only
the adapter tensors (`adapter_weights`). peft is imported only when LoRA is on: it is an optional extra.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from asympo.errors import UserError
from asympo.models.tying import tied_aliases

ADAPTER = "default"  # peft's adapter name; one adapter per model here


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("lora.rank > 0 needs peft: pip install 'asympo[lora]'") from None
    return peft


def has_lora(model: torch.nn.Module) -> bool:
    """peft copies its config onto the model it injects into, and a PeftModel has it too."""
    return hasattr(model, "peft_config")


def apply_lora(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Wrap `model` (a PreTrainedModel) with adapters of `cfg` (asympo.config.LoraConfig); only they train.

    Returns the PeftModel; `model` itself now holds the adapter layers and can be used as before."""
    peft = _peft()
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    from asympo.models.lora_linear import InPlaceLinear  # subclasses peft's layer: the `lora` extra

    config._register_custom_module({torch.nn.Linear: InPlaceLinear})  # peft's hook for layers of one's own
    return peft.get_peft_model(model, config)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model with the adapters injected (a PeftModel's base model), under the plain names."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer  # the `lora` extra

    return {name: m for name, m in _unwrapped(model).named_modules() if isinstance(m, LoraLayer)}


def adapted_weights(model: torch.nn.Module) -> set[str]:
    """The plain names of the weights LoRA changes from one version to the next: the adapted layers'."""
    return {f"{name}.weight" for name in _lora_layers(model)}


def plain_name(name: str) -> str | None:
    """A state-dict name without peft's layers: `q_proj.base_layer.weight` is `q_proj.weight`; an adapter
    tensor (`q_proj.lora_A.default.weight`) has no plain name."""
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under the original names (views, not copies; adapters left out)."""
    state = _unwrapped(model).state_dict()
    return {plain: t for name, t in state.items() if (plain := plain_name(name)) is not None}


@torch.no_grad()
def merged_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model's weights, W + scaling * B @ A, as `publishable_weights` gives them for a plain model
    (detached CPU copies, tied aliases left out, floating tensors in `dtype`).

    Computed beside the model, never by merging into it: peft's merge_adapter/unmerge_adapter would add and
    subtract the delta in place each version, and the frozen base would drift by rounding over a run."""
    deltas = {}
    for name, layer in _lora_layers(model).items():
        if layer.merged:  # someone merged in place: the base weight already holds the delta
            continue
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = layer.get_delta_weight(adapter).float()
                key = f"{name}.weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta
    state = plain_state(model)
    aliases = tied_aliases(state)
    out = {}
    for name, t in state.items():
        if name in aliases:
            continue
        cast = dtype if t.is_floating_point() else None
        if name in deltas:
            out[name] = (t.float() + deltas[name]).to(dtype=cast or t.dtype).cpu()
        else:
            out[name] = t.detach().to(dtype=cast, copy=True).cpu()
    return out


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable (adapter) tensors, under the injected model's state-dict names: what a
    checkpoint saves, and what a Ray actor wrapped with the same config loads."""
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in _unwrapped(model).named_parameters()
        if p.requires_grad
    }


def strip_into(target: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """Turn `target` (a copy of `source`'s injected model) back into the plain architecture, holding
    `source`'s merged weights: for engines and the behaviour-recompute scratch, which load merged weights."""
    for name, layer in _lora_layers(target).items():
        owner, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(owner) if owner else target, leaf, layer.get_base_layer())
    if "peft_config" in target.__dict__:
        del target.peft_config
    target.load_state_dict(merged_weights(source), strict=False)
    return target


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without adapter layers (merged weights, same device and dtype); a plain deepcopy when
    LoRA is off."""
    if not has_lora(model):
        return copy.deepcopy(model)
    return strip_into(copy.deepcopy(_unwrapped(model)), model)


def save_pretrained(peft_model: torch.nn.Module, path: Path) -> None:
    """`final/` under LoRA: the adapter (adapter_config.json, adapter_model.safetensors), which
    `PeftModel.from_pretrained(base, final)` loads, and the merged full model in `final/merged/`, which
    `from_pretrained` loads without peft. Not side by side: transformers takes a folder holding
    adapter_config.json for an adapter and would apply it a second time over merged weights."""
    peft_model.save_pretrained(path)
    plain_copy(peft_model).save_pretrained(path / "merged")
