"""Grafting as a plug-in: a surrogate's translator trains as the LLM's adapter, and an evaluation can
put the run's vision side on another LLM (the full target) zero-shot."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmtrain.config.methods import MethodSpec
from mmtrain.config.schema import InitSource, ModelConfig, RunConfig
from mmtrain.methods.grafting.graft import checkpoint_source, graft_config
from mmtrain.models.llm import decoder_layers
from mmtrain.models.trainability import mark_adapter
from mmtrain.models.vlm import VisionLanguageModel


def mark_translator(model: nn.Module) -> None:
    """Flag a surrogate's translator layer as an adapter, so `trainable: adapters` trains it alone.

    Surrogates built by `mmtrain surrogate build` record the translator's index in their config
    (`mmtrain_surrogate.translator_layer`); other models are left as they are.
    """
    info = getattr(model.config, "mmtrain_surrogate", None)
    if not info:
        return
    index = int(info["translator_layer"])
    layers = decoder_layers(model)
    if not 0 <= index < len(layers):
        raise ValueError(f"the surrogate's config names translator layer {index} but the model has "
                         f"{len(layers)} layers: its config.json was edited or is not a surrogate's")
    mark_adapter(layers[index])


def attach(model: VisionLanguageModel, cfg: ModelConfig) -> None:
    if not model.llm.is_encoder_decoder:
        mark_translator(model.llm.model)


def retarget(cfg: RunConfig, checkpoint: Path, llm: str) -> tuple[RunConfig, InitSource]:
    """Zero-shot grafting: the run's model rebuilt on `llm`, loading only the vision side of its weights."""
    return graft_config(cfg, llm), checkpoint_source(checkpoint)


METHOD = MethodSpec(
    name="grafting",
    summary="Surrogate grafting: train the vision side on a small surrogate of the target LLM, plug it into the target",
    attach_order=0,
    attach=attach,
    retarget=retarget,
)
