"""MMA as a plug-in: attach router adapters (and the LLM's modality token) as the config asks."""

from __future__ import annotations

from mmtrain.config.loader import ConfigError
from mmtrain.config.methods import MethodSpec
from mmtrain.config.schema import LLMConfig, ModelConfig, RunConfig
from mmtrain.methods.mma.adapters import ModalityToken, attach_adapters
from mmtrain.methods.mma.config import AdapterConfig
from mmtrain.models.llm import LanguageModel, decoder_layers, llm_is_encoder_decoder
from mmtrain.models.trainability import mark_adapter
from mmtrain.models.vision import HFVisionTower
from mmtrain.models.vlm import VisionLanguageModel


def attach_vision_adapters(tower, cfg: AdapterConfig):
    """MMA adapters before self-attention in every block of a transformer tower; the routers read
    each sample's CLS token (position 0)."""
    if not isinstance(tower, HFVisionTower):
        raise ValueError(f"model.vision.adapter: MMA adapters go before self-attention in transformer blocks; "
                         f"the {type(tower).__name__} tower has none (use a Hugging Face ViT, kind: hf)")
    return attach_adapters(tower.blocks(), tower.model.config.hidden_size, cfg, key="model.vision.adapter")


def attach_llm_adapters(llm: LanguageModel, cfg: LLMConfig) -> None:
    """The LLM's MMA adapters and, for router adapters by default, the modality token (`cfg.adapter`).

    Called after the LLM is built and outside ZeRO-3's construction context: modules created inside
    it are partitioned before their own initialisation runs, which would lose the zero init.
    """
    if cfg.adapter is None:
        return
    if getattr(cfg, "lora", None) is not None:
        raise ValueError("model.llm: choose one of `adapter` (MMA) and `lora`, not both")
    if llm.is_encoder_decoder:
        raise ValueError("model.llm.adapter: MMA adapters attach to decoder-only LMs; for "
                         f"{llm.model.config.model_type} use model.llm.vl_pet")
    llm.adapters = attach_adapters(decoder_layers(llm.model), llm.hidden_size, cfg.adapter, key="model.llm.adapter")
    wants_token = cfg.adapter.modality_token
    if wants_token is None:
        wants_token = cfg.adapter.kind == "router"
    if wants_token:
        if llm.model.config._attn_implementation == "flash_attention_2":
            if cfg.attn_implementation == "flash_attention_2":
                raise ValueError("model.llm.adapter.modality_token needs a custom attention mask, which "
                                 "flash-attn cannot take: set model.llm.attn_implementation: sdpa (or auto)")
            llm.model.set_attn_implementation("sdpa")  # `auto` picked flash-attn: take the next best
        llm.modality = mark_adapter(ModalityToken(llm.hidden_size))


def attach(model: VisionLanguageModel, cfg: ModelConfig) -> None:
    if cfg.vision.adapter is not None:
        attach_vision_adapters(model.vision, cfg.vision.adapter)
    attach_llm_adapters(model.llm, cfg.llm)


def check(cfg: RunConfig, source: str) -> None:
    """At load: MMA's LLM adapters exclude LoRA and need a decoder-only LLM."""
    llm = cfg.model.llm
    if llm.adapter is None:
        return
    if getattr(llm, "lora", None) is not None:
        raise ConfigError(f"{source}: `model.llm.adapter` (MMA) and `model.llm.lora` are both set; choose one of "
                          "them (remove the other section)")
    if llm_is_encoder_decoder(llm):
        raise ConfigError(f"{source}: `model.llm.adapter`: MMA adapters attach to decoder-only LMs and this LLM is "
                          "an encoder-decoder LM; use `model.llm.vl_pet` for it")


METHOD = MethodSpec(
    name="mma",
    summary="MMA / LaVIN: mixture-of-modality router adapters in the vision tower and the frozen LLM",
    attach_order=10,
    check=check,
    attach=attach,
)
