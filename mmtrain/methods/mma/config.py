"""MMA's settings: the router adapters of the vision tower (`model.vision.adapter`) and of the LLM
(`model.llm.adapter`). Plain dataclasses: imported while the run config's schema is assembled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class AdapterConfig:
    """MMA (LaVIN) adapters: one bottleneck adapter before self-attention in every block.

    `out = x + scale * (w0 * B z + w1 * D z)`, `z = Dropout(A x)`, `w = softmax(W_m m / temperature)`
    over two experts, m = the routing token's input (the LLM's modality token, the vision tower's
    CLS token), computed per sample. A is d -> bottleneck (xavier); B and D are bottleneck -> d,
    grouped, ZERO-initialised, so training starts from the unmodified model.
    """

    kind: Literal["router", "plain"] = "router"
    """`router`: two up-projections mixed by the router (MMA); `plain`: one up-projection, no router
    (the ablation)."""
    bottleneck: int = 8
    temperature: float = 10.0
    """Router softmax temperature (LaVIN: 10 at 7B, 5 at 13B)."""
    scale: float = 1.0
    dropout: float = 0.1
    groups: int = 2
    """Groups of the up-projections (a grouped 1x1 convolution in LaVIN)."""
    modality_token: bool | None = None
    """LLM only: prepend a learned modality token (0 = text only, 1 = image) at position 0 that no
    other token attends to and that drives the routers. Default: on for `router` adapters in the
    LLM, off otherwise."""


SECTIONS = {"model.vision": {"adapter": AdapterConfig}, "model.llm": {"adapter": AdapterConfig}}
