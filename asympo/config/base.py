"""The base of every config: unknown keys are errors, and where a model runs (`device`, `precision`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

Precision = Literal["auto", "fp32", "bf16"]
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """For config validators: the form only (whether the device exists is decided at run time)."""
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got '{name}')")
    return name


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config names itself instead of being ignored."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Placed(Strict):
    """`device` and `precision` of the learner and the in-process engines (see asympo.models.device)."""

    device: str = "auto"
    """Where the learner and in-process engines run: `auto` (CUDA when present, else the CPU), `cpu`,
    `cuda` or `cuda:N`. A CUDA device that is not there is an error."""
    precision: Precision = "auto"
    """`fp32`, `bf16` (float32 master weights, bf16 autocast and engine weights) or `auto`: bf16 where the
    hardware runs it fast (the run logs its choice and why)."""

    @field_validator("device")
    @classmethod
    def _device(cls, name: str) -> str:
        return check_device_name(name)
