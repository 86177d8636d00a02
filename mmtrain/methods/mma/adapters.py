"""MMA (LaVIN's mixture-of-modality adaptation): router adapters, their placement, the modality token.

One adapter sits before self-attention in every block, `h = x + Attn(adapter(norm(x)))`, in the
LLM and in a Hugging Face vision tower. It is attached with a forward hook on the block's
pre-attention norm and registered as the block's child module `mma_adapter` (so ZeRO-3's module
hooks gather its parameters and checkpoints name it); `AttachedAdapters.remove()` takes both away
and leaves the model exactly as it was. Nothing in transformers is edited or patched.

The router reads the adapter's input at position 0 of each sample: the modality token in the LLM
(`ModalityToken`: prepended at position 0; no other token attends to it), the CLS token in a ViT.
Routing is per sample (LaVIN's official ViT code routed the whole batch on its first element).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmtrain.methods.mma.config import AdapterConfig
from mmtrain.models.trainability import mark_adapter

CHILD_NAME = "mma_adapter"
# The module each block family applies right before self-attention, in lookup order:
# Llama/Qwen2/Mistral, CLIP/SigLIP, ViT, DINOv2, GPT-2.
PRE_ATTENTION_NORMS = ("input_layernorm", "layer_norm1", "layernorm_before", "norm1", "ln_1")


class RouterAdapter(nn.Module):
    """`x + scale * (w0 * B z + w1 * D z)` with `z = Dropout(A x)` and `w = softmax(W_m x[:, 0] / t)`.

    A: d -> bottleneck (xavier); B, D: bottleneck -> d as grouped 1x1 convolutions, zero-initialised
    (LaVIN's parameter layout, so counts match its 3.78M). With `router=False` only B exists: the
    plain adapter `x + scale * B z` of the ablation.
    """

    def __init__(self, dim: int, cfg: AdapterConfig, router: bool = True, key: str = "adapter") -> None:
        super().__init__()
        if cfg.bottleneck % cfg.groups:
            raise ValueError(f"{key}.bottleneck={cfg.bottleneck} is not divisible by {key}.groups={cfg.groups}; "
                             "make the bottleneck a multiple of the groups")
        if dim % cfg.groups:
            raise ValueError(f"the model width {dim} is not divisible by {key}.groups={cfg.groups}; choose "
                             "groups that divide it")
        self.down = nn.Conv1d(dim, cfg.bottleneck, 1)
        self.up = nn.Conv1d(cfg.bottleneck, dim, 1, groups=cfg.groups)
        self.up_alt = nn.Conv1d(cfg.bottleneck, dim, 1, groups=cfg.groups) if router else None
        self.router = nn.Linear(dim, 2) if router else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.scale
        self.temperature = cfg.temperature
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for up in (self.up, self.up_alt):
            if up is not None:
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2] expert weights of each sample, from its position-0 input."""
        assert self.router is not None
        return torch.softmax(self.router(x[:, 0]).float() / self.temperature, dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dropout(self.down(x.transpose(1, 2)))
        if self.router is None:
            delta = self.up(z)
        else:
            w = self.routing_weights(x)
            delta = self.up(z) * w[:, 0, None, None] + self.up_alt(z) * w[:, 1, None, None]
        return x + self.scale * delta.transpose(1, 2)


def pre_attention_norm(block: nn.Module) -> nn.Module:
    """The norm whose output feeds the block's self-attention."""
    for name in PRE_ATTENTION_NORMS:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"cannot place an MMA adapter in {type(block).__name__}: none of its children is a pre-attention norm "
        f"({', '.join(PRE_ATTENTION_NORMS)})"
    )


@dataclass
class AttachedAdapters:
    """The adapters placed in a list of blocks; `remove()` restores the blocks exactly."""

    blocks: list[nn.Module]
    handles: list[RemovableHandle] = field(default_factory=list)

    def adapters(self) -> list[RouterAdapter]:
        return [getattr(block, CHILD_NAME) for block in self.blocks if hasattr(block, CHILD_NAME)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for block in self.blocks:
            if hasattr(block, CHILD_NAME):
                delattr(block, CHILD_NAME)
        self.handles.clear()


def _apply_adapter(adapter: RouterAdapter):
    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return adapter(output)

    return hook


def attach_adapters(blocks: list[nn.Module] | nn.ModuleList, dim: int, cfg: AdapterConfig,
                    key: str = "adapter") -> AttachedAdapters:
    """One adapter (flagged for `trainable: adapters`) before self-attention in every block;
    `key` (e.g. `model.llm.adapter`) names the config section in error messages."""
    attached = AttachedAdapters(list(blocks))
    for block in attached.blocks:
        if hasattr(block, CHILD_NAME):
            raise ValueError(f"{key}: {type(block).__name__} already has an MMA adapter (attached twice)")
        norm = pre_attention_norm(block)
        adapter = mark_adapter(RouterAdapter(dim, cfg, router=cfg.kind == "router", key=key))
        block.add_module(CHILD_NAME, adapter)
        attached.handles.append(norm.register_forward_hook(_apply_adapter(adapter)))
    return attached


class ModalityToken(nn.Module):
    """LaVIN's modality token: `Embedding(2, d)` (0 = text only, 1 = image) prepended at position 0.

    `prepend` returns the longer inputs: embeddings, an additive 4-D attention mask in which no
    token but the modality token itself attends to position 0 (it only drives the routers), the
    matching position ids, and labels with an ignored first position.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(2, dim)

    def prepend(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        has_image: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        token = self.embedding(has_image.long().to(embeds.device)).to(embeds.dtype).unsqueeze(1)
        embeds = torch.cat([token, embeds], dim=1)
        valid = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1).bool()
        position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        mask = isolated_first_token_mask(valid, embeds.dtype)
        if labels is not None:
            labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        return embeds, mask, position_ids, labels


def isolated_first_token_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask [B, 1, T, T] over `valid` keys ([B, T] bool) where position 0 is seen only
    by itself. Every query also sees itself, so padded rows never become all-masked (NaN)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    allowed = causal.unsqueeze(0) & valid.unsqueeze(1)
    allowed[:, 1:, 0] = False
    allowed |= torch.eye(length, dtype=torch.bool, device=valid.device).unsqueeze(0)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
