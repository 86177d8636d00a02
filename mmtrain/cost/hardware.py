"""Accelerator facts the cost reports need: dense peak FLOP/s by GPU type and precision, memory size.

Peaks are the vendors' dense (no sparsity) tensor-core numbers for bf16/fp16 and the non-tensor
numbers for fp32 (PyTorch does not use TF32 for matmuls unless asked). MFU divides by these; pass
`--peak-tflops` to use another figure (e.g. a CPU's measured peak).
"""

from __future__ import annotations

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},      # H100 SXM5
    "h100-pcie": {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2},
    "h200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "gh200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "a100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "a100-40g": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "l40s": {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6},
    "a10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "v100": {"fp16": 125.0, "fp32": 15.7},
    "mi250x": {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9},
    "mi300x": {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4},
}
MEMORY_GIB: dict[str, float] = {
    "h100": 80, "h100-pcie": 80, "h200": 141, "gh200": 96, "a100": 80, "a100-40g": 40, "l40s": 48, "a10": 24,
    "v100": 32, "mi250x": 128, "mi300x": 192,
}
ALIASES = {"h100-sxm": "h100", "h100_sxm": "h100", "a100-80g": "a100", "a100-sxm": "a100", "a100_80g": "a100",
           "nvidia-h100": "h100", "nvidia-h200": "h200"}


def normalise_gpu_type(name: str | None) -> str | None:
    """`H100`, `h100_sxm`, `nvidia-h100` -> `h100`; None stays None; unknown names are lower-cased."""
    if not name:
        return None
    key = name.strip().lower().replace(" ", "-")
    return ALIASES.get(key, key)


def peak_flops(gpu_type: str | None, precision: str, override_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device, or None when unknown (no table entry and no override)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    table = PEAK_TFLOPS.get(normalise_gpu_type(gpu_type) or "")
    if table is None or precision not in table:
        return None
    return table[precision] * 1e12


def known_gpu_types() -> list[str]:
    return sorted(PEAK_TFLOPS)
