"""Visual prompt generators: a Q-Former-style query resampler, an MLP (per token or per merged block), or none.

The Q-Former resampler has N learned queries that self-attend and cross-attend to the tower's
features for a few layers, so the LLM always sees N visual tokens whatever the image size.
Attention runs through `F.scaled_dot_product_attention` (flash/memory-efficient kernels on GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.config.errors import ConfigError
from mmtrain.config.schema import ResamplerConfig


class Attention(nn.Module):
    """Multi-head attention (self or cross) on SDPA."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.resampler.hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class QFormerLayer(nn.Module):
    """Pre-norm block: self-attention over queries, cross-attention to image features, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, queries: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x)
        queries = queries + self.cross_attn(self.norm_cross(queries), feats)
        return queries + self.mlp(self.norm_mlp(queries))


class QFormerResampler(nn.Module):
    """N learned queries cross-attending to image features -> [B, N, hidden]."""

    def __init__(self, in_dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(in_dim)
        self.input_proj = nn.Linear(in_dim, cfg.hidden_size)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.hidden_size) * 0.02)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.out_dim = cfg.hidden_size
        self.num_queries = cfg.num_queries

    def num_output_tokens(self, in_tokens: int) -> int:
        return self.num_queries

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = self.input_proj(self.input_norm(feats))
        queries = self.queries.unsqueeze(0).expand(feats.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, feats)
        return self.norm(queries)


def merge_patches(feats: torch.Tensor, k: int) -> torch.Tensor:
    """[B, s*s, D] row-major patch tokens -> [B, (s/k)^2, k*k*D]: each k x k block concatenated."""
    b, n, d = feats.shape
    side = math.isqrt(n)
    blocks = feats.view(b, side // k, k, side // k, k, d).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, (side // k) ** 2, k * k * d)


class MLPResampler(nn.Module):
    """Two-layer MLP on every image token (LLaVA-style), or on merged k x k blocks of them (Qwen2-VL)."""

    def __init__(self, in_dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.merge = cfg.spatial_merge
        self.input_norm = nn.LayerNorm(in_dim) if self.merge > 1 else nn.Identity()
        merged_dim = in_dim * self.merge**2
        self.mlp = nn.Sequential(nn.Linear(merged_dim, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.out_dim = cfg.hidden_size

    def num_output_tokens(self, in_tokens: int) -> int:
        if self.merge == 1:
            return in_tokens
        side = math.isqrt(in_tokens)
        if side * side != in_tokens or side % self.merge:
            raise ConfigError(
                f"model.resampler.spatial_merge={self.merge} needs a square grid of image tokens whose side is a "
                f"multiple of {self.merge}, but the tower gives {in_tokens} tokens"
                + ("; set model.vision.drop_cls: true to drop the CLS token" if side * side == in_tokens - 1 else "")
            )
        return (side // self.merge) ** 2

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = self.input_norm(feats)
        if self.merge > 1:
            feats = merge_patches(feats, self.merge)
        return self.mlp(feats)


class IdentityResampler(nn.Module):
    """No resampler: the tower's tokens go straight to the projector (LaVIN's visual path)."""

    def __init__(self, in_dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.out_dim = in_dim

    def num_output_tokens(self, in_tokens: int) -> int:
        return in_tokens

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def build_resampler(in_dim: int, cfg: ResamplerConfig) -> nn.Module:
    """The resampler named by `cfg.kind`."""
    return {"qformer": QFormerResampler, "mlp": MLPResampler, "identity": IdentityResampler}[cfg.kind](in_dim, cfg)
