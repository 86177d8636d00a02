"""Which fused attention kernel the run uses: flash-attn 2 on CUDA when importable, else SDPA.

flash-attn is an optional GPU extra (`pip install -r requirements-gpu.txt`), never required.
"""

from __future__ import annotations

import importlib.util

import torch


def flash_attn_available() -> bool:
    """True when the flash-attn 2 package is importable and a CUDA device is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str) -> str:
    """Map the config's `attn_implementation` to what Hugging Face models are built with.

    `auto` picks `flash_attention_2` when possible and `sdpa` otherwise; an explicit
    `flash_attention_2` without flash-attn or CUDA fails with what to install.
    """
    if requested == "auto":
        return "flash_attention_2" if flash_attn_available() else "sdpa"
    if requested == "flash_attention_2" and not flash_attn_available():
        raise RuntimeError(
            "model.llm.attn_implementation=flash_attention_2 needs a CUDA device and the flash-attn "
            "package (pip install -r requirements-gpu.txt); use `auto` or `sdpa` to fall back to "
            "PyTorch scaled-dot-product attention"
        )
    return requested


def packed_attention_inputs(position_ids: torch.Tensor, attention_mask: torch.Tensor, implementation: str,
                            dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Attention inputs that keep packed samples apart (each sample's positions restart at 0).

    flash-attn reads the sample boundaries from the position ids (varlen kernels, no mask); every
    other implementation gets an additive block-diagonal causal mask [R, 1, T, T]. A padding
    position sees itself, so no row of the mask is empty (NaN).
    """
    if implementation == "flash_attention_2":
        return {"attention_mask": None, "position_ids": position_ids}
    sample = (position_ids == 0).long().cumsum(dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (sample.unsqueeze(2) == sample.unsqueeze(1)) & causal & attention_mask.bool().unsqueeze(1)
    allowed |= torch.eye(length, dtype=torch.bool, device=position_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"attention_mask": mask.unsqueeze(1), "position_ids": position_ids}
