"""Per-component trainability (`frozen | full | adapters`, top-k vision blocks) and the parameter table.

`adapters` trains only parameters of modules marked with `mark_adapter` (the parameter-efficient
methods attach such modules); everything else in that component stays frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtrain.config.schema import ModelConfig

ADAPTER_FLAG = "_mmtrain_adapter"


def mark_adapter(module: nn.Module) -> nn.Module:
    """Flag `module` so that `trainable: adapters` trains its parameters."""
    setattr(module, ADAPTER_FLAG, True)
    return module


def _adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for sub in module.modules():
        if getattr(sub, ADAPTER_FLAG, False):
            params.extend(sub.parameters())
    return params


def apply_trainability(vlm: nn.Module, cfg: ModelConfig) -> None:
    """Set requires_grad on every parameter of the VLM from the model config."""
    specs = {
        "vision": cfg.vision.trainable,
        "resampler": cfg.resampler.trainable,
        "projector": cfg.projector.trainable,
        "llm": cfg.llm.trainable,
    }
    for name, mode in specs.items():
        module = getattr(vlm, name)
        module.requires_grad_(mode == "full")
        if mode == "adapters":
            adapters = _adapter_parameters(module)
            if not adapters:
                raise ValueError(f"model.{name}.trainable=adapters but no adapter modules are attached to {name}")
            for p in adapters:
                p.requires_grad_(True)
    k = cfg.vision.trainable_top_k
    if k:
        blocks = vlm.vision.blocks()
        if not 0 < k <= len(blocks):
            raise ValueError(f"model.vision.trainable_top_k={k} but the tower has {len(blocks)} blocks")
        for block in blocks[-k:]:
            block.requires_grad_(True)


def numel(p: nn.Parameter) -> int:
    """Full element count, also for ZeRO-3 partitioned parameters (whose .numel() is 0) and
    bitsandbytes 4-bit weights (two values packed per byte)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_table(vlm: nn.Module) -> list[dict[str, int | str]]:
    """Rows of {component, trainable, frozen, total} plus a `total` row."""
    rows = []
    for name, module in vlm.components().items():
        trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
        total = sum(numel(p) for p in module.parameters())
        rows.append({"component": name, "trainable": trainable, "frozen": total - trainable, "total": total})
    rows.append({
        "component": "total",
        "trainable": sum(r["trainable"] for r in rows),
        "frozen": sum(r["frozen"] for r in rows),
        "total": sum(r["total"] for r in rows),
    })
    return rows


def format_parameter_table(rows: list[dict[str, int | str]]) -> str:
    """A fixed-width table for the log."""
    lines = [f"{'component':<10} {'trainable':>14} {'frozen':>14} {'total':>14}  {'% trainable':>11}"]
    for r in rows:
        pct = 100.0 * int(r["trainable"]) / max(int(r["total"]), 1)
        lines.append(f"{r['component']:<10} {r['trainable']:>14,} {r['frozen']:>14,} {r['total']:>14,}  {pct:>10.2f}%")
    return "\n".join(lines)
