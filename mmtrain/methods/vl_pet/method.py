"""VL-PET as a plug-in: attach its modules to an encoder-decoder LLM as `model.llm.vl_pet` asks."""

from __future__ import annotations

from mmtrain.config.methods import MethodSpec
from mmtrain.config.loader import ConfigError
from mmtrain.config.schema import ModelConfig, RunConfig
from mmtrain.methods.vl_pet.config import VLPETConfig
from mmtrain.methods.vl_pet.modules import AttachedVLPET, attach_vl_pet
from mmtrain.models.llm import LanguageModel, llm_is_encoder_decoder
from mmtrain.models.vlm import VisionLanguageModel


def attach_to_llm(llm: LanguageModel, cfg: VLPETConfig) -> AttachedVLPET:
    """Attach VL-PET to a `Seq2SeqLM`; its modules and encoder norms are flagged as adapters (`llm.vl_pet`)."""
    if not llm.is_encoder_decoder:
        raise ValueError(f"model.llm.vl_pet needs an encoder-decoder LM (T5, BART); {llm.model.config.model_type} "
                         "is decoder-only (use model.llm.adapter for MMA adapters, or model.llm.lora)")
    if getattr(llm, "vl_pet", None) is not None:
        raise ValueError("VL-PET is already attached to this LM")
    llm.vl_pet = attach_vl_pet(llm.model, cfg)
    return llm.vl_pet


def attach(model: VisionLanguageModel, cfg: ModelConfig) -> None:
    if cfg.llm.vl_pet is not None:
        attach_to_llm(model.llm, cfg.llm.vl_pet)


def check(cfg: RunConfig, source: str) -> None:
    """At load: VL-PET needs an encoder-decoder LLM, unquantised."""
    llm = cfg.model.llm
    if llm.vl_pet is None:
        return
    if llm_is_encoder_decoder(llm) is False:
        raise ConfigError(f"{source}: `model.llm.vl_pet` needs an encoder-decoder LM (T5, BART) and this LLM is "
                          "decoder-only; use `model.llm.adapter` (MMA) or `model.llm.lora` for it")
    if llm.quantization != "none":
        raise ConfigError(f"{source}: `model.llm.quantization` = {llm.quantization!r} is for decoder-only LMs; "
                          "VL-PET's encoder-decoder LM loads unquantised (set it to none)")


METHOD = MethodSpec(
    name="vl_pet",
    summary="VL-PET: granularity-controlled modules on an encoder-decoder LLM (T5, BART)",
    attach_order=20,
    check=check,
    attach=attach,
)
