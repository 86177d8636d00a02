"""Training FLOPs of a VLM step, frozen-aware: what the ledger records and the estimate predicts.

Forward FLOPs are counted, not guessed: each component runs once on a dummy input of the real
shapes (one image; one sequence of the typical length) with the FLOP formulas of `torch.utils.flop_counter`, which
counts every matmul, convolution and attention kernel. That works on real weights and on the
meta device alike (shapes are all it needs), so a 70B configuration is counted without weights.

A training step then costs, per component, forward FLOPs x a pass multiplier:
- 1 for the forward;
- + 1 for the backward to its inputs, when anything trainable sits in it or before it (the
  gradient has to flow through it); a frozen component with nothing trainable before it runs
  forward only (the VLM runs it under no_grad);
- + its trainable share (the weight gradients, about one forward's worth for a fully trainable
  component);
- + 1 for the LLM under gradient checkpointing (the forward is recomputed in the backward).
So a frozen tower before a trainable projector costs 1x, the projector 3x, the frozen LLM after it
2x, a fully trainable LLM 3x. Per step: vision, resampler and projector scale with the number of
images, the LLM with the number of tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from mmtrain.models.trainability import numel

PER_IMAGE = ("vision", "resampler", "projector")


@dataclass
class StepFlops:
    """Per-unit forward FLOPs and pass multipliers of one model; `step()` prices a step."""

    forward: dict[str, float]
    """Forward FLOPs per image (vision, resampler, projector) and per token (llm)."""
    multipliers: dict[str, float]
    measured_sequence: int
    """Sequence length the LLM's per-token FLOPs were counted at (attention grows with it)."""
    notes: list[str] = field(default_factory=list)

    def step(self, tokens: float, images: float) -> float:
        """Training FLOPs for `tokens` LLM tokens and `images` images."""
        total = 0.0
        for name, flops in self.forward.items():
            units = tokens if name == "llm" else images
            total += self.multipliers.get(name, 1.0) * flops * units
        return total

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pass_multipliers(model: nn.Module, gradient_checkpointing: bool = False) -> dict[str, float]:
    """Forward + backward passes each component costs per step, in forward units (module docstring)."""
    out: dict[str, float] = {}
    trainable_before = False
    for name, module in model.components().items():
        total = trainable = 0
        for p in module.parameters():
            n = numel(p)
            total += n
            if p.requires_grad:
                trainable += n
        gradient_flows = trainable_before or trainable > 0
        multiplier = 1.0 + (1.0 if gradient_flows else 0.0) + (trainable / total if total else 0.0)
        if name == "llm" and gradient_checkpointing and gradient_flows:
            multiplier += 1.0
        out[name] = round(multiplier, 6)
        trainable_before = trainable_before or trainable > 0
    return out


def count_forward_flops(model: nn.Module, sequence_length: int, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> dict[str, float]:
    """Forward FLOPs of each component for one image (vision side) and per token (LLM).

    Runs each component on zeros of the right shape under no_grad; collective under ZeRO-3
    (every rank must call it, as for any forward). Nothing about the model changes.
    """
    vision = model.vision
    param = next(model.parameters())
    device = device if device is not None else param.device
    dtype = dtype if dtype is not None else param.dtype
    out: dict[str, float] = {}
    with torch.no_grad():
        x: Any = torch.zeros((1, *vision.image_shape), device=device, dtype=dtype)
        for name in PER_IMAGE:
            with FlopCount() as counter:
                x = getattr(model, name)(x)
            out[name] = float(counter.total)
        length = max(int(sequence_length), 1)
        embeds = torch.zeros((1, length, x.shape[-1]), device=device, dtype=x.dtype)
        mask = torch.ones((1, length), dtype=torch.long, device=device)
        modality = getattr(model.llm, "modality", None)
        extra = {"has_image": torch.ones(1, dtype=torch.bool, device=device)} if modality is not None else {}
        with FlopCount() as counter:
            model.llm(inputs_embeds=embeds, attention_mask=mask, **extra)
        out["llm"] = float(counter.total) / length
    return out


class FlopCount(TorchDispatchMode):
    """Adds up the FLOPs of every operator PyTorch's FLOP formulas know (matmuls, convolutions, fused
    attention), plus the CPU's fused attention kernel, which PyTorch's table lacks.

    Unlike `torch.utils.flop_counter.FlopCounterMode` it tracks no module hierarchy, so it needs no
    autograd hooks and leaves the model (and a DeepSpeed engine's gradient hooks) untouched.
    """

    def __init__(self) -> None:
        super().__init__()

        self.total = 0
        self.formulas = dict(flop_registry)
        cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if cpu_attention is not None:
            self.formulas[cpu_attention] = _attention_flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, out_val=out, **kwargs))
        return out


def _attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(tuple(query.shape), tuple(key.shape), tuple(value.shape))


def step_flops_model(model: nn.Module, sequence_length: int, gradient_checkpointing: bool = False,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StepFlops:
    """Count the forward FLOPs and derive the multipliers of `model` (see the module docstring)."""
    forward = count_forward_flops(model, sequence_length, device, dtype)
    notes = []
    if forward["llm"] == 0:  # e.g. bitsandbytes' quantised matmuls are custom kernels the counter skips
        forward["llm"] = 2.0 * _matmul_parameters(model.llm)
        notes.append("the counter saw no LLM FLOPs (quantised kernels?): 2 x non-embedding parameters per token")
    if getattr(model, "reads_cached_features", False) and getattr(model, "cached_from_block", None) is None:
        forward["vision"] = 0.0
        notes.append("the frozen tower's outputs come from a feature cache: no tower FLOPs in the steps")
    return StepFlops(forward=forward, multipliers=pass_multipliers(model, gradient_checkpointing),
                     measured_sequence=int(sequence_length), notes=notes)


def _matmul_parameters(module: nn.Module) -> int:
    """Parameters outside embedding tables (each does one multiply-add per token)."""
    embedding = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(numel(p) for p in module.parameters() if id(p) not in embedding)
