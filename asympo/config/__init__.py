"""Typed configuration: the pydantic classes of every command, and `build_config` (YAML + `key=value`).

This package is the bottom layer: it imports nothing from the rest of asympo but `asympo.errors`, so every
part can depend on it. Each field's docstring is its documentation: `asympo <command> --help` prints them and
docs/configuration.md is generated from them.
"""

from asympo.config.base import Placed, Precision, Strict, check_device_name
from asympo.config.commands import (
    STUDY_BASE,
    STUDY_VARIANTS,
    BenchConfig,
    BenchSection,
    EvalConfig,
    ServeConfig,
    SFTConfig,
    StudyConfig,
)
from asympo.config.data import FewShot, PromptConfig, TaskConfig
from asympo.config.env import EnvConfig
from asympo.config.loading import (
    apply_override,
    build_config,
    format_validation_error,
    load_yaml,
    preset_names,
)
from asympo.config.model import TinyModelConfig
from asympo.config.objective import OBJECTIVE_NAMES, Aggregation, ObjectiveConfig, ObjectiveName
from asympo.config.rollout import OpenAIEngineConfig, RolloutConfig, SamplingConfig, VLLMEngineConfig
from asympo.config.train import (
    BehaviourConfig,
    FaultsConfig,
    LearnerConfig,
    LoraConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)

__all__ = [
    "OBJECTIVE_NAMES", "STUDY_BASE", "STUDY_VARIANTS", "Aggregation", "BehaviourConfig", "BenchConfig",
    "BenchSection", "EnvConfig", "EvalConfig", "FaultsConfig", "FewShot", "LearnerConfig", "LoraConfig",
    "ObjectiveConfig", "ObjectiveName", "OpenAIEngineConfig", "OptimConfig", "Placed", "Precision",
    "PromptConfig", "RolloutConfig", "RuntimeConfig", "SFTConfig", "SamplingConfig", "ServeConfig",
    "Strict", "StudyConfig", "TaskConfig", "TinyModelConfig", "TrainConfig", "VLLMEngineConfig",
    "apply_override", "build_config", "check_device_name", "format_validation_error", "load_yaml",
    "preset_names",
]  # fmt: skip
