"""Projectors from the resampler width into the LLM's input-embedding width.

The linear projector is what VPGTrans composes with its word converter (W_t = W_w W_s), so it is
kept a plain `nn.Linear` whose `weight`/`bias` names are stable in checkpoints.
"""

from __future__ import annotations

from torch import nn

from mmtrain.config.schema import ProjectorConfig


class LinearProjector(nn.Linear):
    """y = W x + b into the LLM width."""


class MLPProjector(nn.Sequential):
    """Linear -> GELU -> Linear into the LLM width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def build_projector(in_dim: int, out_dim: int, cfg: ProjectorConfig) -> nn.Module:
    """The projector named by `cfg.kind`."""
    if cfg.kind == "linear":
        return LinearProjector(in_dim, out_dim)
    return MLPProjector(in_dim, out_dim)
