"""Typed configs per part, presets as data, and the loader that merges them."""

from rigtrain.config.loading import build_config, load_config, preset_names
from rigtrain.config.schema import ConfigError, DataConfig, EvalConfig, ModelConfig, RigConfig, RunConfig, TrainConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RigConfig",
    "RunConfig",
    "TrainConfig",
    "build_config",
    "load_config",
    "preset_names",
]
