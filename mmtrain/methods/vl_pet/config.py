"""VL-PET's settings (`model.llm.vl_pet`). Plain dataclasses: imported while the run config's schema is assembled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class VLPETConfig:
    """VL-PET on an encoder-decoder LM (T5, BART): granularity-controlled modules after every encoder
    self-attention and FFN (encoder LayerNorms trainable), and a parallel adapter on every decoder
    cross-attention's value path. Everything else in the LM stays frozen."""

    gate: Literal["large", "middle_x", "middle_y", "small", "none"] = "large"
    """Granularity of the gate G: large (N x d), middle_x (N x 1), middle_y (1 x d), small (1 x 1)."""
    rank: int | None = None
    """Bottleneck width r of the encoder modules (default: 96 BART, 192 T5)."""
    value_rank: int | None = None
    """Bottleneck width of the decoder's value adapters (default: 96, the official BART and T5 scripts)."""
    heads: int = 4
    """Heads N_h of the multi-head down-projection (each d -> r / N_h)."""
    gate_rank: int | None = None
    """Low rank of the `large` gate (default: 96 BART, 192 T5, as the official scripts)."""
    gate_scale: float | None = None
    """s in the gates (default: 1 BART, 0.3 T5)."""
    train_encoder_norms: bool = True


SECTIONS = {"model.llm": {"vl_pet": VLPETConfig}}
