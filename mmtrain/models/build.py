"""Assemble a VisionLanguageModel and its tokenizer from the model config.

The vision side is built first (seeded, ordinary construction). The LLM is built last inside
`llm_context`, which the engine sets to DeepSpeed's ZeRO-3 construction context when the run is
ZeRO-3, so only the LLM's partition ever lives on a rank. Then every method plug-in attaches its
modules (`MethodSpec.attach`, in attach order) and trainability is applied.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from mmtrain.config.methods import with_hook
from mmtrain.config.schema import ModelConfig
from mmtrain.models.attention import resolve_attn_implementation
from mmtrain.models.llm import build_llm, load_tokenizer
from mmtrain.models.projector import build_projector
from mmtrain.models.resampler import build_resampler
from mmtrain.models.trainability import apply_trainability
from mmtrain.models.vision import build_vision_tower
from mmtrain.models.vlm import VisionLanguageModel


def build_vlm(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    llm_context: ContextManager | None = None,
    with_tokenizer: bool = True,
):
    """Build the VLM and tokenizer; trainability applied.

    Args:
        with_tokenizer: False builds the model alone (the tokenizer is then None), e.g. on the meta
            device for parameter counts.

    Returns:
        (model, tokenizer, attn_implementation)
    """
    attn = resolve_attn_implementation(cfg.llm.attn_implementation)
    tokenizer = load_tokenizer(cfg.llm) if with_tokenizer else None
    torch.manual_seed(cfg.init_seed)
    vision = build_vision_tower(cfg.vision, attn)
    resampler = build_resampler(vision.out_dim, cfg.resampler)
    with llm_context or contextlib.nullcontext():
        llm = build_llm(cfg.llm, attn, dtype)
    if tokenizer is not None and len(tokenizer) > llm.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the LLM's vocabulary has {llm.vocab_size}: "
            "model.llm.tokenizer does not belong to this LLM"
        )
    torch.manual_seed(cfg.init_seed + 1)
    projector = build_projector(resampler.out_dim, llm.hidden_size, cfg.projector)
    model = VisionLanguageModel(vision, resampler, projector, llm)
    # The methods' modules are built here, seeded and outside the ZeRO-3 construction context:
    # modules created inside it are partitioned before their own (e.g. zero) initialisation runs.
    torch.manual_seed(cfg.init_seed + 2)
    for _, attach in with_hook("attach"):
        attach(model, cfg)
    apply_trainability(model, cfg)
    return model, tokenizer, attn
