"""Accelerator selection for DeepSpeed (CUDA when present, else CPU with the gloo backend)."""

from __future__ import annotations

import os


def configure_accelerator_env() -> None:
    """Set DS_ACCELERATOR=cpu on machines without CUDA (before deepspeed is imported)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu"
