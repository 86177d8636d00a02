"""LoRA's settings (`model.llm.lora`). Plain dataclasses: imported while the run config's schema is assembled."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoRAConfig:
    """LoRA on the LLM's linear layers, through PEFT (the comparison baseline)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


SECTIONS = {"model.llm": {"lora": LoRAConfig}}
