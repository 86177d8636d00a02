"""Accelerator selection for DeepSpeed (CUDA when present, else CPU with the gloo backend)."""

from __future__ import annotations

import ctypes
import os

import torch


def configure_accelerator_env() -> None:
    """Set DS_ACCELERATOR=cpu on machines without CUDA (before deepspeed is imported)."""
    if "DS_ACCELERATOR" in os.environ:
        return

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu"


def release_large_frees_to_os(threshold_bytes: int = 4 << 20) -> None:
    """Serve allocations above `threshold_bytes` with mmap so their memory returns to the OS when freed.

    On CPU, ZeRO-3 gathers and frees full parameters every step; glibc's default (a threshold that
    grows with each freed block) keeps those blocks in the heap and the process's resident memory
    climbs to the sum of everything ever gathered. A fixed threshold keeps it at what is live.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, threshold_bytes)
        # Fixing the mmap threshold also freezes the trim threshold at 128 KiB, which makes the heap
        # shrink and regrow every step (page faults in every kernel); keep up to 256 MiB instead.
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        pass


def move_buffers(model, device) -> None:
    """Move every buffer of `model` to `device` (parameters untouched).

    Under ZeRO-3 DeepSpeed places the parameters itself and never moves the module, so buffers of
    parts built outside `zero.Init` (the vision tower's `position_ids`, say) would stay on the CPU.
    """
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)
