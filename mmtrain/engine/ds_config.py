"""Load a DeepSpeed JSON from `ds_configs/` and fill its `"auto"` values from the run config.

The run config is the one source of truth for batch sizes, accumulation, precision, clipping and
the optimizer; the JSON holds what is DeepSpeed's own (ZeRO stage, offload, buckets). A value the
run config owns that the JSON sets explicitly to something else is an error (two sources of truth
would disagree silently), and so is an `"auto"` this module does not know how to fill.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mmtrain.config.schema import RunConfig
from mmtrain.errors import UserError


class DeepSpeedConfigError(UserError, ValueError):
    """The DeepSpeed JSON is unreadable or inconsistent with the run config."""


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON, naming the file on failure."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError(
            f"deepspeed: no such file {path}; use one of ds_configs/zero2.json, zero3.json, zero3_offload.json"
        ) from None
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def fill_ds_config(
    ds: dict[str, Any], cfg: RunConfig, world_size: int, hidden_size: int, source: str = "deepspeed"
) -> dict[str, Any]:
    """Return a copy of `ds` with every `"auto"` resolved from `cfg`.

    Args:
        world_size: data-parallel ranks (for `train_batch_size`).
        hidden_size: the LLM's hidden size (ZeRO-3 bucket and persistence heuristics).
    """
    ds = copy.deepcopy(ds)
    if "scheduler" in ds:
        raise DeepSpeedConfigError(
            f"{source}: remove the `scheduler` block; the LR schedule comes from the run config (optim.schedule, "
            "optim.warmup_steps, optim.min_lr_ratio)"
        )
    owned: dict[tuple[str, ...], Any] = {
        ("train_micro_batch_size_per_gpu",): cfg.micro_batch_size,
        ("gradient_accumulation_steps",): cfg.grad_accum_steps,
        ("train_batch_size",): cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        ("gradient_clipping",): cfg.grad_clip,
        ("bf16", "enabled"): cfg.precision == "bf16",
        ("fp16", "enabled"): cfg.precision == "fp16",
    }
    for key, value in owned.items():
        _set_owned(ds, key, value, source)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise DeepSpeedConfigError(f"{source}: optimizer.type={opt.get('type')!r}; mmtrain drives AdamW")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    for name, value in {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                        "weight_decay": cfg.optim.weight_decay}.items():
        _set_owned(ds, ("optimizer", "params", name), value, source)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if cfg.optim.name == "adamw8bit":
        if offload:
            raise DeepSpeedConfigError(f"{source}: optim.name=adamw8bit runs bitsandbytes' optimizer on the "
                                       "parameters' device; remove zero_optimization.offload_optimizer (DeepSpeed's "
                                       "CPU Adam is what offload uses)")
        # The trainer builds bitsandbytes' AdamW8bit from the same values and hands it to DeepSpeed.
        del ds["optimizer"]
        ds["zero_allow_untested_optimizer"] = True
    elif params.get("torch_adam", "auto") == "auto":
        # DeepSpeedCPUAdam handles offload. Otherwise torch's AdamW: the trainable part (VPG, adapters)
        # is small, so a fused kernel gains nothing measurable, and no op is JIT-built at start-up (on
        # GPUs FusedAdam's build needs nvcc, and DeepSpeed 0.19.8 fails to parse the 'sm_90a' entry of
        # CUDA 13 torch wheels' arch list on Hopper).
        params["torch_adam"] = not offload
    return _fill_common(ds, hidden_size, source)


def fill_parameter_only_ds_config(ds: dict[str, Any], micro_batch_size: int, precision: str, world_size: int,
                                  hidden_size: int, source: str = "deepspeed") -> dict[str, Any]:
    """A copy of `ds` for an engine that holds parameters and trains nothing (evaluation, the logit lens):
    the optimizer block is dropped and every `"auto"` is filled from these values."""
    ds = copy.deepcopy(ds)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    owned: dict[tuple[str, ...], Any] = {
        ("train_micro_batch_size_per_gpu",): micro_batch_size,
        ("gradient_accumulation_steps",): 1,
        ("train_batch_size",): micro_batch_size * world_size,
        ("bf16", "enabled"): precision == "bf16",
        ("fp16", "enabled"): precision == "fp16",
    }
    for key, value in owned.items():
        node = ds
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value  # nothing trains: the JSON's own batch settings do not matter here
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 0.0
    return _fill_common(ds, hidden_size, source)


def _fill_common(ds: dict[str, Any], hidden_size: int, source: str) -> dict[str, Any]:
    zero = ds.get("zero_optimization", {})
    heuristics = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in heuristics.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if ds.get("steps_per_print") == "auto":
        ds["steps_per_print"] = 10**9
    leftover = list(_find_auto(ds))
    if leftover:
        raise DeepSpeedConfigError(
            f"{source}: cannot fill \"auto\" for {', '.join(leftover)}; give explicit values there"
        )
    return ds


def _set_owned(ds: dict[str, Any], key: tuple[str, ...], value: Any, source: str) -> None:
    node = ds
    for part in key[:-1]:
        node = node.setdefault(part, {})
    current = node.get(key[-1], "auto")
    if current != "auto" and current != value and not (isinstance(value, list) and list(current) == value):
        run_key = {
            "train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps": "grad_accum_steps",
            "train_batch_size": "micro_batch_size x grad_accum_steps x world size", "gradient_clipping": "grad_clip",
            "enabled": "precision", "lr": "optim.lr", "betas": "optim.betas", "eps": "optim.eps",
            "weight_decay": "optim.weight_decay",
        }.get(key[-1], key[-1])
        raise DeepSpeedConfigError(
            f"{source}: `{'.'.join(key)}` = {current!r} disagrees with the run config ({run_key} gives {value!r}); "
            "set it to \"auto\" and change the run config instead"
        )
    node[key[-1]] = value


def _find_auto(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _find_auto(v, f"{prefix}{k}.")
    elif node == "auto":
        yield prefix.rstrip(".")
