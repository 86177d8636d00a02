"""LoRA on the LLM through PEFT, flagged like the other adapters (`trainable: adapters`).

PEFT's `inject_adapter_in_model` replaces the targeted linear layers in place with LoRA layers
(the frozen base weight plus `lora_A`/`lora_B`, B zero-initialised); the wrapper class of the model
is unchanged, so the rest of mmtrain sees the same Hugging Face model.
"""

from __future__ import annotations

from torch import nn

from mmtrain.methods.lora.config import LoRAConfig
from mmtrain.models.trainability import mark_adapter


def attach_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA into `model`'s `cfg.target_modules` and flag the LoRA matrices as adapters."""
    # heavy: only when LoRA is attached
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise ValueError(f"model.llm.lora.target_modules: {', '.join(missing)} not found in the LLM; "
                         f"its linear layers are named e.g. {', '.join(sorted(_linear_names(model))[:8])}")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    inject_adapter_in_model(config, model)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            mark_adapter(module)
    return model


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
