"""Value rules of a run config: what the loader's type checks cannot see.

The loader (`mmtrain.config.loader`) checks that every key exists and has the right type; these
rules check the values: a learning rate that is not positive, a micro-batch of 0, a ZeRO-3
DeepSpeed JSON with a quantised LLM... Each would otherwise end deep inside torch or DeepSpeed
with a traceback that names neither the key nor the fix. Every broken rule is reported at once
(one a line), in the loader's style: `CONFIG: `optim.lr` = -0.001 must be > 0 (e.g. 1e-4)`.

- `check_values(cfg, source)`: rules that hold wherever a config is loaded (training, `mmtrain
  params`, `cost estimate`, `submit` on a login node, eval of a run). Called by `load_config`.
- `check_training(cfg, source)`: rules for training on this machine (precision=fp16 needs a GPU,
  a training manifest is set). Not in `load_config`: a config for a GPU job stays loadable on a
  login node or a laptop (`mmtrain submit`, `params`, `cost estimate`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from mmtrain.config.errors import ConfigError
from mmtrain.config.schema import DEFAULT_COLLECTIVE_TIMEOUT_S, RunConfig

LR_COMPONENTS = ("vision", "resampler", "projector", "llm")
"""Keys of `optim.lr_multipliers` (the VLM's components, `mmtrain.models.vlm.COMPONENTS`)."""


def check_values(cfg: RunConfig, source: str = "config") -> None:
    """Check the values of a loaded run config.

    Args:
        cfg: the config as the loader built it (types already checked).
        source: the config file's name, at the start of the message (as the loader's messages).

    Raises:
        ConfigError: one message naming every broken rule's key, its value and what to do.
    """
    problems = value_problems(cfg)
    if problems:
        raise ConfigError(format_problems(source, problems))


def check_training(cfg: RunConfig, source: str = "config") -> None:
    """Check what training this config needs of this machine and of the config beyond `check_values`.

    Raises:
        ConfigError: precision=fp16 without a GPU; no training manifest.
    """
    problems = []
    if cfg.precision == "fp16" and not _gpu_available():
        problems.append("precision=fp16 needs a GPU; on CPU use fp32 (bf16 works but is far slower there)")
    if not cfg.data.train:
        problems.append("`data.train`: set the training manifest (a JSONL file, or a list of them)")
    if problems:
        raise ConfigError(format_problems(source, problems))


def format_problems(source: str, problems: list[str]) -> str:
    """`SOURCE: PROBLEM` for one problem; for several, one a line under `SOURCE: N values to fix:`."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} values to fix:\n" + "\n".join(f"  {p}" for p in problems)


def value_problems(cfg: RunConfig) -> list[str]:
    """Every broken value rule of `cfg`, one sentence each naming the key (empty when all hold)."""
    problems: list[str] = []

    def at_least(key: str, value: Any, low: int | float, meaning: str = "", optional: bool = False) -> None:
        if value is None and optional:
            return
        if not _finite(value) or value < low:
            problems.append(f"`{key}` = {value!r} must be {'a finite number ' if _not_finite(value) else ''}"
                            f">= {low}{meaning}")

    def above(key: str, value: Any, low: float, meaning: str = "") -> None:
        if not _finite(value) or value <= low:
            problems.append(f"`{key}` = {value!r} must be {'a finite number ' if _not_finite(value) else ''}"
                            f"> {low:g}{meaning}")

    def within(key: str, value: Any, low: float, high: float, meaning: str = "", high_open: bool = False) -> None:
        if not _finite(value) or value < low or (value >= high if high_open else value > high):
            interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
            problems.append(f"`{key}` = {value!r} must be in {interval}{meaning}")

    optim = cfg.optim
    above("optim.lr", optim.lr, 0, " (e.g. 1e-4)")
    at_least("micro_batch_size", cfg.micro_batch_size, 1, " (samples per rank per forward)")
    at_least("grad_accum_steps", cfg.grad_accum_steps, 1, " (1 = no accumulation)")
    at_least("max_steps", cfg.max_steps, 1, " (optimizer steps of the whole run)")
    at_least("stop_after_steps", cfg.stop_after_steps, 1, " (or null: run to max_steps)", optional=True)
    at_least("log_every", cfg.log_every, 1)
    at_least("collective_timeout_s", cfg.collective_timeout_s, 1,
             f" (seconds a collective waits for the other ranks before failing; default {DEFAULT_COLLECTIVE_TIMEOUT_S})")
    at_least("eval_every", cfg.eval_every, 0, " (0 = only at the end)")
    at_least("checkpoint.save_every", cfg.checkpoint.save_every, 0, " (0 = only at the end)")
    # 0 has always kept every checkpoint (save_checkpoint prunes only when keep_last > 0).
    at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 0,
             " (how many checkpoints to keep; 0 keeps every one)")
    at_least("optim.warmup_steps", optim.warmup_steps, 0, " (0 = no warm-up)")
    within("optim.min_lr_ratio", optim.min_lr_ratio, 0, 1, " (the cosine schedule ends at optim.lr x min_lr_ratio)")
    at_least("optim.weight_decay", optim.weight_decay, 0, " (0 = no weight decay)")
    for i, beta in enumerate(optim.betas):
        within(f"optim.betas[{i}]", beta, 0, 1, " (AdamW's betas, e.g. [0.9, 0.999])", high_open=True)
    above("optim.eps", optim.eps, 0, " (e.g. 1e-8)")
    at_least("grad_clip", cfg.grad_clip, 0, " (0 = no clipping)")
    at_least("model.resampler.spatial_merge", cfg.model.resampler.spatial_merge, 1, " (1 = keep every token)")
    if cfg.model.resampler.spatial_merge > 1 and cfg.model.resampler.kind != "mlp":
        problems.append(f"`model.resampler.spatial_merge` = {cfg.model.resampler.spatial_merge} applies to "
                        f"`kind: mlp` only, not {cfg.model.resampler.kind!r}; set it to 1 or use the MLP resampler")
    at_least("data.max_length", cfg.data.max_length, 1, " (tokens per sample, image tokens included)")
    if cfg.data.num_workers != "auto":
        at_least("data.num_workers", cfg.data.num_workers, 0, " (0 = load in the training process, or auto)")
    if cfg.data.packing and cfg.data.group_by != "none":
        problems.append(f"`data.group_by` = {cfg.data.group_by!r} does not apply with `data.packing: true` "
                        "(rows are filled in shuffled order); set data.group_by: none or data.packing: false")
    at_least("data.train_samples", cfg.data.train_samples, 1, " (or null: every sample)", optional=True)
    at_least("data.val_samples", cfg.data.val_samples, 1, " (or null: every sample)", optional=True)
    for component, factor in optim.lr_multipliers.items():
        key = f"optim.lr_multipliers.{component}"
        if component not in LR_COMPONENTS:
            close = difflib.get_close_matches(str(component), LR_COMPONENTS, n=1)
            hint = f" Did you mean optim.lr_multipliers.{close[0]}?" if close else ""
            problems.append(f"`{key}`: unknown component {component!r}.{hint} "
                            f"Valid components: {', '.join(LR_COMPONENTS)}")
        else:
            above(key, factor, 0, " (the component's LR is optim.lr x this factor; "
                                  "freeze a component with model.<component>.trainable instead)")
    problems += _quantization_problems(cfg)
    return problems


def _quantization_problems(cfg: RunConfig) -> list[str]:
    """A bitsandbytes-quantised LLM cannot be partitioned by ZeRO-3."""
    quantization = cfg.model.llm.quantization
    if quantization == "none" or _zero_stage(cfg.deepspeed) != 3:
        return []
    return [f"model.llm.quantization={quantization}: ZeRO-3 cannot partition bitsandbytes-quantised weights; "
            f"use a ZeRO-1/2 config ({cfg.deepspeed} is stage 3)"]


def _zero_stage(path: str | None) -> int | None:
    """The ZeRO stage of the DeepSpeed JSON at `path`, or None when it cannot be read here.

    A missing or broken file is not this module's to report: the engine names it when it loads the
    JSON (the path may also be relative to where training runs, not to where the config is loaded).
    """
    if not path:
        return None
    try:
        ds = json.loads(Path(path).read_text())
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        return int(stage)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _gpu_available() -> bool:
    """Whether training here runs on a CUDA GPU (as the engine decides: DS_ACCELERATOR=cpu forces the CPU)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return False
    return torch.cuda.is_available()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)
