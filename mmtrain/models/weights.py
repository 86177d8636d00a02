"""Trainable-only weights as safetensors: save from a plain module, load without DeepSpeed.

A checkpoint holds only parameters that train (never the frozen LLM). Loading checks every tensor
name and shape against the model and says which are unknown, missing or mis-shaped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TRAINABLE_FILE = "trainable.safetensors"


class IncompatibleCheckpointError(ValueError):
    """The checkpoint does not fit the model it is loaded into."""


def load_trainable_weights(model: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load a trainable-only safetensors file (or a checkpoint folder holding one) into `model`.

    Args:
        strict: also fail when a parameter the model trains is absent from the file.

    Returns:
        The names loaded.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / TRAINABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no trainable-weights file at {path}")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
              for k, v in tensors.items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors) if strict else []
    if unknown or shapes or missing:
        parts = []
        if unknown:
            parts.append(f"unknown to the model: {', '.join(unknown[:8])}")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:8])}")
        if missing:
            parts.append(f"trainable in the model but absent: {', '.join(missing[:8])}")
        raise IncompatibleCheckpointError(
            f"{path} does not fit this model ({' | '.join(parts)}); check that the run config's model "
            "section matches the one the checkpoint was trained with"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return sorted(tensors)
