"""The vision-tower interface and the registry of tower families (`model.vision.kind`).

A family registers a builder under its kind (`@register_vision_tower("mobilenetv2")`);
`mmtrain.models.vision.build_vision_tower` builds the one a config names.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mmtrain.config.schema import VisionConfig

VisionBuilder = Callable[[VisionConfig, str], "VisionTower"]
VISION_TOWERS: dict[str, VisionBuilder] = {}


def register_vision_tower(kind: str) -> Callable[[VisionBuilder], VisionBuilder]:
    """Decorator: make `model.vision.kind: <kind>` build towers with the decorated function."""

    def wrap(builder: VisionBuilder) -> VisionBuilder:
        VISION_TOWERS[kind] = builder
        return builder

    return wrap


class VisionTower(nn.Module):
    """Interface shared by all towers."""

    out_dim: int
    num_tokens: int
    image_shape: tuple[int, int, int]

    def image_transform(self, image) -> torch.Tensor:  # PIL.Image -> [C, H, W]
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The tower's sequential blocks, bottom to top (for `trainable_top_k`)."""
        raise NotImplementedError
