"""Model components: vision towers, resamplers, projectors, LLM wrappers and the VLM."""

from mmtrain.models.build import build_vlm
from mmtrain.models.trainability import format_parameter_table, mark_adapter, parameter_table
from mmtrain.models.vlm import VisionLanguageModel
from mmtrain.models.weights import IncompatibleCheckpointError, load_init_weights, load_trainable_weights

__all__ = [
    "IncompatibleCheckpointError", "VisionLanguageModel", "build_vlm", "format_parameter_table",
    "load_init_weights", "load_trainable_weights", "mark_adapter", "parameter_table",
]
