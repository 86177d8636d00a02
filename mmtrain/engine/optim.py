"""Parameter groups with per-component learning rates, and the warm-up + cosine/constant schedule.

Each trainable component gets its own groups (with and without weight decay) at
`optim.lr * optim.lr_multipliers[component]`; the schedule multiplies every group's base LR by the
same factor, so a 5x projector stays 5x throughout.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mmtrain.config.errors import ConfigError
from mmtrain.config.schema import OptimConfig
from mmtrain.models.vlm import COMPONENTS


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters, one pair (decay / no decay) per component.

    Raises:
        ConfigError: an unknown `optim.lr_multipliers` key, or no trainable parameter at all.
    """
    unknown = sorted(set(cfg.lr_multipliers) - set(COMPONENTS))
    if unknown:  # also a config rule (mmtrain.config.rules); kept for OptimConfigs built in code
        raise ConfigError(
            f"optim.lr_multipliers: unknown component(s) {', '.join(unknown)}; valid: {', '.join(COMPONENTS)}"
        )
    groups: list[dict[str, Any]] = []
    for component in COMPONENTS:
        module = getattr(model, component)
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        lr = cfg.lr * cfg.lr_multipliers.get(component, 1.0)
        for params, wd, suffix in ((decay, cfg.weight_decay, ""), (no_decay, 0.0, "/no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": component + suffix})
    if not groups:
        raise ConfigError("nothing to train: every component is frozen (set model.<component>.trainable)")
    return groups


def build_optimizer_args(groups: list[dict[str, Any]], cfg: OptimConfig) -> dict[str, Any]:
    """`deepspeed.initialize` keywords: the groups for DeepSpeed's AdamW (from the JSON), or, for
    `adamw8bit`, bitsandbytes' AdamW8bit built here (8-bit moments; small tensors stay 32-bit)."""
    if cfg.name == "adamw":
        return {"model_parameters": groups}
    try:
        # optional and heavy: only for a quantised LLM or the 8-bit optimizer
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RuntimeError(f"optim.name=adamw8bit needs bitsandbytes (pip install -r requirements.txt): {exc}") from None
    optimizer = bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                    weight_decay=cfg.weight_decay)
    return {"optimizer": optimizer}


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base LR for the update at 0-based optimizer step `step`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(cfg: OptimConfig, max_steps: int):
    """A callable `optimizer -> LambdaLR` for `deepspeed.initialize(lr_scheduler=...)`."""
    def make(optimizer):
        return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))

    return make
