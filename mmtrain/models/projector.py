"""Projectors from the resampler width into the LLM's input-embedding width.

The linear projector is what VPGTrans composes with its word converter (W_t = W_w W_s), so it is
kept a plain `nn.Linear` whose `weight`/`bias` names are stable in checkpoints.

With `image_boundaries`, the projector also owns learned begin-of-image and end-of-image
embeddings (`projector.begin_image`, `projector.end_image`, in the LLM's embedding space) and
returns them around each image's visual tokens, as the grafting recipes train them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmtrain.config.schema import ProjectorConfig


class LinearProjector(nn.Linear):
    """y = W x + b into the LLM width."""


ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


class MLPProjector(nn.Sequential):
    """Linear -> activation -> Linear into the LLM width (hidden width: the LLM's, unless given)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, activation: str = "gelu") -> None:
        hidden = hidden or out_dim
        super().__init__(nn.Linear(in_dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, out_dim))


class _ImageBoundaries:
    """Mixin: `begin_image` / `end_image` embeddings around the projected tokens ([B, N, H] -> [B, N+2, H])."""

    extra_tokens = 2

    def _init_boundaries(self, out_dim: int) -> None:
        # N(0, 1/d), as the grafting code initialises its begin/end-of-image embeddings
        self.begin_image = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim))
        self.end_image = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(x)
        batch = tokens.shape[0]
        begin = self.begin_image.to(tokens.dtype).expand(batch, 1, -1)
        end = self.end_image.to(tokens.dtype).expand(batch, 1, -1)
        return torch.cat([begin, tokens, end], dim=1)


class BoundedLinearProjector(_ImageBoundaries, LinearProjector):
    """`LinearProjector` with begin/end-of-image embeddings."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self._init_boundaries(out_dim)


class BoundedMLPProjector(_ImageBoundaries, MLPProjector):
    """`MLPProjector` with begin/end-of-image embeddings."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, activation: str = "gelu") -> None:
        super().__init__(in_dim, out_dim, hidden, activation)
        self._init_boundaries(out_dim)


def _xavier(projector: nn.Module) -> nn.Module:
    with torch.no_grad():
        for layer in projector.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    return projector


def build_projector(in_dim: int, out_dim: int, cfg: ProjectorConfig) -> nn.Module:
    """The projector named by `cfg.kind` (with begin/end-of-image embeddings if `cfg.image_boundaries`)."""
    if cfg.kind == "linear":
        if cfg.hidden_size is not None or cfg.activation != "gelu":
            raise ValueError("model.projector.hidden_size/activation apply to kind: mlp only")
        projector = (BoundedLinearProjector if cfg.image_boundaries else LinearProjector)(in_dim, out_dim)
    else:
        projector = (BoundedMLPProjector if cfg.image_boundaries else MLPProjector)(in_dim, out_dim, cfg.hidden_size,
                                                                                    cfg.activation)
    return _xavier(projector) if cfg.init == "xavier" else projector
