"""Composing the word converter with a source projector: the target projector VPGTrans starts from.

The converter is applied AFTER the source projector (the paper's Eq. 2 writes the composition the
other way round; the official code and the dimensions agree with this one):
    W_t = W_w @ W_s,   b_t = W_w @ b_s + b_w
so `projector_t(x) = converter(projector_s(x))` exactly, for every input x.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from mmtrain.methods.vpgtrans.converter import ConverterError, load_converter
from mmtrain.models.weights import trainable_weights_file
from mmtrain.utils.io import atomic_write_bytes

PROJECTOR_KEYS = ("projector.weight", "projector.bias")


def merge_projector(source_weight: torch.Tensor, source_bias: torch.Tensor, converter_weight: torch.Tensor,
                    converter_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_t, b_t) of the merged linear projector, computed in float64 and returned as float32."""
    if converter_weight.shape[1] != source_weight.shape[0]:
        raise ConverterError(f"the converter maps {converter_weight.shape[1]}-wide embeddings but the source "
                             f"projector outputs {source_weight.shape[0]}: the converter was fitted for another "
                             "source LLM")
    w_w, b_w = converter_weight.double(), converter_bias.double()
    weight = w_w @ source_weight.double()
    bias = w_w @ source_bias.double() + b_w
    return weight.float(), bias.float()


def merge_checkpoint(checkpoint: str | Path, converter: str | Path, out: str | Path) -> dict[str, tuple[int, ...]]:
    """Write a trainable-weights file whose projector is converter-after-projector; the rest unchanged.

    Returns the shapes of the tensors written.
    """
    path = trainable_weights_file(Path(checkpoint))
    if not path.is_file():
        raise ConverterError(f"no trainable-weights file at {path}")
    tensors = load_file(str(path))
    missing = [k for k in PROJECTOR_KEYS if k not in tensors]
    if missing:
        raise ConverterError(f"{path} has no {', '.join(missing)}: the word converter composes with a linear "
                             "projector (model.projector.kind: linear) that the checkpoint trained")
    weight, bias, _ = load_converter(converter)
    tensors["projector.weight"], tensors["projector.bias"] = merge_projector(
        tensors["projector.weight"], tensors["projector.bias"], weight, bias)
    atomic_write_bytes(out, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))
    return {k: tuple(v.shape) for k, v in tensors.items()}
