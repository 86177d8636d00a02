"""Training FLOPs of a VLM step, frozen-aware: what the ledger records and the estimate predicts.

Forward FLOPs are counted, not guessed: each component runs once on a dummy input of the real
shapes (one image; one sequence of the typical length) with the FLOP formulas of `torch.utils.flop_counter`, which
counts every matmul, convolution and attention kernel. That works on real weights and on the
meta device alike (shapes are all it needs), so a 70B configuration is counted without weights.

A training step then costs, per component, forward FLOPs x a pass multiplier:
- 1 for the forward;
- + 1 for the backward to its inputs, when anything trainable sits in it or before it (the
  gradient has to flow through it); a frozen component with nothing trainable before it runs
  forward only (the VLM runs it under no_grad). An LLM whose first trainable part is a decoder
  layer deep inside it (a surrogate's translator) with nothing trainable before it backpropagates
  from that layer on only: its backward counts the share of the forward FLOPs from that layer on;
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

from mmtrain.models.llm import decoder_layers
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


def pass_multipliers(model: nn.Module, gradient_checkpointing: bool = False,
                     llm_backward_share: float = 1.0) -> dict[str, float]:
    """Forward + backward passes each component costs per step, in forward units (module docstring).

    `llm_backward_share`: the share of the LLM's forward FLOPs its input-gradient backward repeats
    when nothing before it trains (`count_forward_flops`'s `llm_backward_share`).
    """
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
        backward = 1.0 if trainable_before else llm_backward_share if name == "llm" else 1.0
        multiplier = 1.0 + (backward if gradient_flows else 0.0) + (trainable / total if total else 0.0)
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
        start = _gradient_start(model.llm)
        before: list[float] = []
        hook = start.register_forward_pre_hook(lambda *_: before.append(counter.total)) if start else None
        try:
            with FlopCount() as counter:
                model.llm(inputs_embeds=embeds, attention_mask=mask, **extra)
        finally:
            if hook is not None:
                hook.remove()
        out["llm"] = float(counter.total) / length
        out["llm_backward_share"] = 1.0 - before[0] / counter.total if before and counter.total else 1.0
    return out


def _gradient_start(llm: nn.Module) -> nn.Module | None:
    """The decoder layer the LLM's backward starts at when its first trainable parameters sit in a
    decoder layer after the first one (nothing trainable before it); None otherwise."""
    try:
        layers = list(decoder_layers(getattr(llm, "model", llm)))
    except ValueError:
        return None
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    if any(p.requires_grad and id(p) not in in_layers for p in llm.parameters()):
        return None  # embeddings, norms, a head or a modality token train: the gradient reaches everything
    first = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), None)
    return layers[first] if first else None


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
    backward_share = forward.pop("llm_backward_share")
    notes = []
    if forward["llm"] == 0:  # e.g. bitsandbytes' quantised matmuls are custom kernels the counter skips
        forward["llm"] = 2.0 * _matmul_parameters(model.llm)
        notes.append("the counter saw no LLM FLOPs (quantised kernels?): 2 x non-embedding parameters per token")
    if getattr(model, "reads_cached_features", False) and getattr(model, "cached_from_block", None) is None:
        forward["vision"] = 0.0
        notes.append("the frozen tower's outputs come from a feature cache: no tower FLOPs in the steps")
    if backward_share < 1.0:
        notes.append(f"the LLM's backward starts at its first trainable decoder layer: {backward_share:.3f} of its "
                     "forward")
    return StepFlops(forward=forward, multipliers=pass_multipliers(model, gradient_checkpointing, backward_share),
                     measured_sequence=int(sequence_length), notes=notes)


def _matmul_parameters(module: nn.Module) -> int:
    """Parameters outside embedding tables (each does one multiply-add per token)."""
    embedding = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(numel(p) for p in module.parameters() if id(p) not in embedding)
