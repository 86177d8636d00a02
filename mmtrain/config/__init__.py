"""Run configuration: schema and strict loading."""

from mmtrain.config.loader import ConfigError, dump_config, from_dict, load_config, to_dict
from mmtrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    LLMConfig,
    ModelConfig,
    OptimConfig,
    ProjectorConfig,
    ResamplerConfig,
    RunConfig,
    VisionConfig,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LLMConfig", "ModelConfig", "OptimConfig",
    "ProjectorConfig", "ResamplerConfig", "RunConfig", "VisionConfig", "dump_config", "from_dict",
    "load_config", "to_dict",
]
