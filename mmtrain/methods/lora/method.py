"""LoRA as a plug-in: inject LoRA into the LLM as `model.llm.lora` asks."""

from __future__ import annotations

from mmtrain.config.methods import MethodSpec
from mmtrain.config.schema import ModelConfig
from mmtrain.methods.lora.inject import attach_lora
from mmtrain.models.vlm import VisionLanguageModel


def attach(model: VisionLanguageModel, cfg: ModelConfig) -> None:
    if cfg.llm.lora is not None:
        attach_lora(model.llm.model, cfg.llm.lora)


METHOD = MethodSpec(
    name="lora",
    summary="LoRA on the LLM's linear layers through PEFT (the parameter-efficient baseline)",
    attach_order=30,
    attach=attach,
)
