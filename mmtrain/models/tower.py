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

    def bottom(self, pixel_values: torch.Tensor, start: int) -> torch.Tensor:
        """The input of block `start` (what a feature cache keeps when the blocks from `start` on train)."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its forward at a block")

    def top(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """`forward`'s features, from the input of block `start` (`bottom`'s output)."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its forward at a block")

    def feature_block(self) -> int:
        """How many blocks the features have passed through (the blocks after them are unused)."""
        return len(self.blocks())
