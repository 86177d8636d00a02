"""Map a trained VLM onto Hugging Face's LLaVA layout (`LlavaForConditionalGeneration`).

A model maps when it is LLaVA-shaped: a Hugging Face vision tower, `resampler.kind: identity`, an MLP
projector into the LLM's width with GELU (LLaVA-1.5's `mlp2x_gelu`), and a decoder-only LLM with no
modules of a method in it. `feature_layer` becomes `vision_feature_layer`; `drop_cls` becomes
`vision_feature_select_strategy` (`default` drops the CLS token, `full` keeps every token). The LLM's
vocabulary gains one `<image>` token, whose positions LLaVA fills with the visual tokens (its
embedding row is never read). Anything else fails with what does not map and what would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmtrain.errors import UserError

IMAGE_TOKEN = "<image>"


class NotMappableError(UserError):
    """The model has a part that LLaVA's layout cannot hold."""


@dataclass
class LlavaWeights:
    """What an export writes: the LLaVA config (a dict for `LlavaConfig`) and the weights by LLaVA name."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def check_mappable(model: nn.Module, cfg: Any) -> None:
    """Raise NotMappableError naming the first part of `model` that LLaVA's layout cannot hold."""
    def refuse(component: str, what: str, would: str) -> None:
        raise NotMappableError(f"cannot export to the Hugging Face LLaVA format: {component} is {what}; "
                               f"LLaVA holds {would}")

    vision = model.vision
    if cfg.model.vision.kind != "hf" or not hasattr(vision, "model"):
        refuse("model.vision", f"kind {cfg.model.vision.kind!r}", "a Hugging Face vision tower (kind: hf)")
    if vision.cls_every:
        refuse("model.vision", "cls_every (LaVIN's CLS tokens)", "one hidden state's tokens (feature_layer)")
    if getattr(cfg.model.vision, "adapter", None) is not None:
        refuse("model.vision", "carrying MMA adapters", "a plain tower")
    if cfg.model.resampler.kind != "identity":
        refuse("model.resampler", f"kind {cfg.model.resampler.kind!r}", "no resampler (kind: identity)")
    projector = model.projector
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if cfg.model.projector.kind != "mlp" or len(linears) != 2 or getattr(projector, "image_boundaries", False) \
            or cfg.model.projector.image_boundaries:
        refuse("model.projector", f"kind {cfg.model.projector.kind!r}", "a two-layer MLP (kind: mlp)")
    if cfg.model.projector.activation != "gelu":
        refuse("model.projector", f"an MLP with {cfg.model.projector.activation}", "an MLP with gelu")
    if linears[0].out_features != model.llm.hidden_size:
        refuse("model.projector", f"an MLP {linears[0].out_features} wide",
               f"an MLP as wide as the LLM ({model.llm.hidden_size}; projector.hidden_size: null)")
    if model.llm.is_encoder_decoder:
        refuse("model.llm", "an encoder-decoder LM", "a decoder-only LLM")
    if getattr(model.llm, "modality", None) is not None:
        refuse("model.llm", "carrying an MMA modality token", "a plain LLM")
    foreign = [name for name, _ in model.llm.model.named_parameters()
               if any(tag in name for tag in ("mma_adapter", "vl_pet"))]
    if foreign:
        refuse("model.llm", f"carrying a method's modules ({foreign[0]})",
               "the LLM's own weights (LoRA is merged into them)")


def merged_state_dict(language_model: nn.Module, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LLM's weights by their plain names, LoRA layers merged (W + B A x scaling, PEFT's own delta).

    Args:
        base: the LLM's full-precision weights, for a quantised LLM (whose own weights are 4/8-bit):
            its frozen weights are those, plus the trained LoRA deltas.
    """
    state = dict(base) if base is not None else dict(language_model.state_dict())
    for name, module in language_model.named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")):
            continue
        weight = (base[f"{name}.weight"] if base is not None else module.base_layer.weight.detach()).clone().float()
        for adapter in module.active_adapters:
            weight += module.get_delta_weight(adapter).float()
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state[f"{name}.weight"] = weight
        bias = base.get(f"{name}.bias") if base is not None else getattr(module.base_layer, "bias", None)
        if bias is not None:
            state[f"{name}.bias"] = bias.detach()
    return state


def full_precision_weights(cfg: Any) -> dict[str, torch.Tensor] | None:
    """A quantised LLM's weights as stored before quantisation (None when the LLM is not quantised)."""
    llm = cfg.model.llm
    if llm.quantization == "none":
        return None
    if not llm.name_or_path:
        raise NotMappableError("cannot export a quantised LLM built from a config: its full-precision weights are "
                               "nowhere (model.llm.name_or_path is not set)")
    # heavy (seconds to import): only where a quantised model is exported
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm.name_or_path, dtype=torch.float32,
                                                 trust_remote_code=llm.trust_remote_code)
    return model.state_dict()


def llava_weights(model: nn.Module, cfg: Any, tokenizer_size: int) -> LlavaWeights:
    """The LLaVA config and weights of `model` (full tensors, on the CPU), its vocabulary grown by `<image>`.

    Args:
        tokenizer_size: the tokenizer's length before `<image>` is added; `<image>` gets this id.
    """
    check_mappable(model, cfg)
    vision = model.vision
    hf_vision = vision.model
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf_vision.state_dict().items():
        state[f"model.vision_tower.{name}"] = tensor
    vision_config = hf_vision.config.to_dict()
    if hasattr(hf_vision, "embeddings") and vision_config.get("model_type") == "clip_vision_model":
        # A CLIP dual encoder's image side (CLIPVisionTransformer): LLaVA builds CLIPVisionModel around it.
        state = {f"model.vision_tower.vision_model.{k.removeprefix('model.vision_tower.')}": v for k, v in state.items()}
    first, second = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    for index, linear in ((1, first), (2, second)):
        state[f"model.multi_modal_projector.linear_{index}.weight"] = linear.weight
        state[f"model.multi_modal_projector.linear_{index}.bias"] = linear.bias
    language_model = model.llm.model
    text_config = language_model.config.to_dict()
    text_config.pop("quantization_config", None)  # exported in full precision
    decoder_prefix = language_model.base_model_prefix + "."
    for name, tensor in merged_state_dict(language_model, full_precision_weights(cfg)).items():
        if name.startswith(decoder_prefix):
            state[f"model.language_model.{name.removeprefix(decoder_prefix)}"] = tensor
        else:
            state[name] = tensor  # lm_head.weight
    image_token_id = tokenizer_size
    vocab = max(text_config["vocab_size"], image_token_id + 1)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] < vocab:
            grown = state[name].new_zeros(vocab, state[name].shape[1])
            grown[: state[name].shape[0]] = state[name]
            state[name] = grown
    if text_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    text_config["vocab_size"] = vocab
    num_tokens = model.num_image_tokens
    config = {
        "vision_config": vision_config, "text_config": text_config, "image_token_index": image_token_id,
        "image_seq_length": num_tokens, "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.model.vision.feature_layer,
        "vision_feature_select_strategy": "default" if vision.has_cls and vision.drop_cls else "full",
        "multimodal_projector_bias": True, "tie_word_embeddings": bool(text_config.get("tie_word_embeddings")),
    }
    return LlavaWeights(config=config, state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()})
