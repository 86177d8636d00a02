"""Trainable-only weights as safetensors: save from a plain module, load without DeepSpeed.

A checkpoint holds only parameters that train (never the frozen LLM). Loading checks every tensor
name and shape against the model and says which are unknown, missing or mis-shaped.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mmtrain.config.paths import TRAINABLE_FILE, RunDir, latest_checkpoint
from mmtrain.errors import UserError


class WeightsFileMissingError(UserError, FileNotFoundError):
    """A weights file (an `init` source, a checkpoint's trainable weights) is not where the user said."""


class IncompatibleCheckpointError(UserError, ValueError):
    """The checkpoint does not fit the model it is loaded into."""


def load_trainable_weights(model: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load a trainable-only safetensors file (or a checkpoint folder holding one) into `model`.

    Args:
        strict: also fail when a parameter the model trains is absent from the file.

    Returns:
        The names loaded.
    """
    path = trainable_weights_file(Path(path))
    if not path.is_file():
        raise WeightsFileMissingError(f"no trainable-weights file at {path}")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
              for k, v in tensors.items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors) if strict else []
    if unknown or shapes or missing:
        parts = []
        if unknown:
            parts.append(f"unknown to the model: {', '.join(unknown[:8])}")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:8])}")
        if missing:
            parts.append(f"trainable in the model but absent: {', '.join(missing[:8])}")
        raise IncompatibleCheckpointError(
            f"{path} does not fit this model ({' | '.join(parts)}); check that the run config's model "
            "section matches the one the checkpoint was trained with"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return sorted(tensors)


def trainable_weights_file(path: Path) -> Path:
    """The weights file of an init path: a .safetensors file, a checkpoint folder, or a run folder (its
    latest complete checkpoint)."""
    if not path.is_dir():
        return path
    if not (path / TRAINABLE_FILE).is_file() and RunDir(path).checkpoints.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest / TRAINABLE_FILE
    return path / TRAINABLE_FILE


def renamed(name: str, rename: dict[str, str]) -> str:
    """`name` with the first matching prefix of an init source's `rename` replaced."""
    for old, new in rename.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def load_init_weights(model: nn.Module, source) -> list[str]:
    """Copy the tensors selected by one `init` source (an `InitSource`) into `model`.

    Works on plain modules and on ZeRO-3 partitioned ones (each partitioned parameter is gathered,
    written and re-partitioned). Returns the model parameter names written.

    Raises:
        FileNotFoundError: no weights file at `source.path`.
        IncompatibleCheckpointError: a selected tensor has no same-named, same-shaped parameter (strict),
            or nothing at all was selected.
    """
    path = trainable_weights_file(Path(source.path))
    if not path.is_file():
        raise WeightsFileMissingError(f"init: no weights file at {path} (expected a .safetensors file, a checkpoint "
                                f"folder holding {TRAINABLE_FILE}, or a run folder with a complete checkpoint)")
    tensors = load_file(str(path))
    selected: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        name = renamed(name, source.rename)
        if not source.modules or any(name == m or name.startswith(m.rstrip(".") + ".") for m in source.modules):
            selected[name] = tensor
    if not selected:
        raise IncompatibleCheckpointError(
            f"init: {path} has no tensors under {', '.join(source.modules)} (it holds: "
            f"{', '.join(sorted({n.split('.')[0] for n in tensors}))})")
    params = dict(model.named_parameters())
    problems: dict[str, str] = {}
    for name, tensor in selected.items():
        param = params.get(name)
        shape = tuple(getattr(param, "ds_shape", param.shape)) if param is not None else None
        if param is None:
            problems[name] = "not a parameter of the model"
        elif shape != tuple(tensor.shape):
            problems[name] = f"file {tuple(tensor.shape)} vs model {shape}"
    if problems and source.strict:
        listed = "; ".join(f"{n}: {why}" for n, why in list(problems.items())[:8])
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise IncompatibleCheckpointError(
            f"init: {path} does not fit this model ({listed}{more}); check init.modules/rename and that the "
            "model section matches the one the weights were trained with")
    loaded = [n for n in selected if n not in problems]
    partitioned = [params[n] for n in loaded if hasattr(params[n], "ds_id")]
    if partitioned:  # ZeRO-3: gather, write on every rank (same values), re-partition on exit
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
    else:
        gather = contextlib.nullcontext()
    with gather, torch.no_grad():
        for name in loaded:
            params[name].copy_(selected[name].to(params[name].dtype))
    return loaded
