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
