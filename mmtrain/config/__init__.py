"""Run configuration: schema (with the methods' sections), strict loading, rules, run-folder paths."""

from mmtrain.config.loader import ConfigError, check_config, dump_config, from_dict, load_config, to_dict
from mmtrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    LLMConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ProjectorConfig,
    ResamplerConfig,
    RunConfig,
    VisionConfig,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LLMConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "ProjectorConfig", "ResamplerConfig", "RunConfig", "VisionConfig", "check_config", "dump_config", "from_dict",
    "load_config", "to_dict",
]
