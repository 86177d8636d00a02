"""Checkpoints: trainable-only safetensors + a DeepSpeed resume state, written atomically.

Layout of one checkpoint, `OUTPUT_DIR/checkpoints/step_00000040/`:
- `trainable.safetensors`: the trainable parameters only, gathered under ZeRO-3; loads without
  DeepSpeed (`mmtrain.models.load_trainable_weights`). The frozen LLM is never copied.
- `ds/`: DeepSpeed's state of the trainable part (optimizer partitions, LR scheduler, client
  state) for an exact resume, saved with `exclude_frozen_parameters=True`.
- `meta.json`: step and bookkeeping, written last.
Everything is written under `step_XXXXXXXX.tmp/` and renamed when complete, so a job killed
mid-save leaves only a `.tmp` folder that is never picked up (and is cleared by the next save).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mmtrain.config.paths import (
    DS_TAG,
    META_FILE,
    TRAINABLE_FILE,
    checkpoint_dir,
    complete_checkpoints,
    latest_checkpoint,
)
from mmtrain.errors import UserError
from mmtrain.utils.io import atomic_write_json

__all__ = ["DS_TAG", "META_FILE", "TRAINABLE_FILE", "CheckpointMismatchError", "ResumeCheckpointError",
           "check_checkpoint_fits", "checkpoint_dir", "complete_checkpoints", "latest_checkpoint",
           "load_checkpoint", "resolve_resume", "save_checkpoint", "trainable_state_dict"]
_GATHER_CHUNK = 50_000_000
_MISMATCHES_SHOWN = 3



class ResumeCheckpointError(UserError, FileNotFoundError):
    """`checkpoint.resume` names a folder that is not a complete mmtrain checkpoint."""


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint to resume from holds trainable parameters of another model (other names or shapes)."""


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from for `checkpoint.resume` (`auto`, `never` or a folder).

    Raises:
        ResumeCheckpointError: a folder without meta.json and ds/ (also a FileNotFoundError).
    """
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / META_FILE).is_file() or not (path / DS_TAG).is_dir():
        raise ResumeCheckpointError(
            f"checkpoint.resume={resume}: not a complete mmtrain checkpoint (expected {META_FILE} and {DS_TAG}/ "
            "inside); use `auto` to pick the latest complete one"
        )
    return path


def trainable_state_dict(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Trainable parameters as full CPU tensors on rank 0 (empty dict elsewhere).

    ZeRO-3 partitions are gathered a chunk at a time, so no rank ever holds more than one chunk
    of gathered trainable weights beyond its own partition.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    chunk: list[tuple[str, nn.Parameter]] = []
    size = 0

    def flush() -> None:
        nonlocal chunk, size
        if not chunk:
            return
        params = [p for _, p in chunk]
        if any(hasattr(p, "ds_id") for p in params):
            # heavy; imported where used, once the accelerator is chosen
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:
                    out.update({n: p.detach().cpu().clone().contiguous() for n, p in chunk})
        elif rank == 0:
            out.update({n: p.detach().cpu().clone().contiguous() for n, p in chunk})
        chunk, size = [], 0

    for name, p in named:
        chunk.append((name, p))
        size += int(getattr(p, "ds_numel", p.numel()))
        if size >= _GATHER_CHUNK:
            flush()
    flush()
    return out


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Save a complete checkpoint for `step` (collective: every rank must call it)."""
    # heavy; imported where used, once the accelerator is chosen
    import deepspeed.comm as dist
    rank = dist.get_rank()
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    state = trainable_state_dict(engine.module, rank)
    if rank == 0:
        save_file(state, str(tmp / TRAINABLE_FILE), metadata={"format": "pt", "step": str(step)})
        atomic_write_json(tmp / META_FILE, {"step": step, "trainable": sorted(state), **client_state})
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore the DeepSpeed state from a checkpoint folder; returns its client state.

    Raises:
        CheckpointMismatchError: the checkpoint's trainable parameters are not the model's (a config
            changed since it was saved: another resampler, projector, adapter...).
    """
    check_checkpoint_fits(engine.module, path)
    try:
        load_path, client_state = engine.load_checkpoint(
            str(path), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True
        )
    except RuntimeError as exc:
        # torch's load_state_dict: a shape the check above could not see (no trainable.safetensors).
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        details = "; ".join(line.strip().rstrip(".") for line in str(exc).splitlines()[1:1 + _MISMATCHES_SHOWN])
        raise CheckpointMismatchError(_mismatch_message(path, details)) from None
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_TAG}")
    meta = json.loads((path / META_FILE).read_text())
    return {**meta, **(client_state or {})}


def check_checkpoint_fits(model: nn.Module, path: Path) -> None:
    """Raise CheckpointMismatchError unless the checkpoint's trainable tensors (names and full shapes,
    from its `trainable.safetensors` header: nothing is read) are exactly `model`'s trainable parameters.

    DeepSpeed restores only these (the checkpoint excludes frozen ones), and its optimizer state is laid
    out for exactly this set: any other set fails deep inside DeepSpeed (a size mismatch in
    `load_state_dict`, or a ZeRO "parameter-alignment layout" error). Skipped for a checkpoint without
    the file (DeepSpeed's own load then decides).
    """
    weights = path / TRAINABLE_FILE
    if not weights.is_file():
        return

    with safe_open(str(weights), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    current = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()
               if p.requires_grad}
    if saved == current:
        return
    problems = []
    shapes = [f"{name} (checkpoint {list(saved[name])}, model {list(current[name])})"
              for name in current if name in saved and saved[name] != current[name]]
    if shapes:
        problems.append(f"{len(shapes)} of another shape: {_first(shapes)}")
    only_saved = [name for name in saved if name not in current]
    if only_saved:
        problems.append(f"{len(only_saved)} only in the checkpoint: {_first(only_saved)}")
    only_model = [name for name in current if name not in saved]
    if only_model:
        problems.append(f"{len(only_model)} only in the model: {_first(only_model)}")
    raise CheckpointMismatchError(_mismatch_message(path, "; ".join(problems)))


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_MISMATCHES_SHOWN])
    return shown + (f", and {len(items) - _MISMATCHES_SHOWN} more" if len(items) > _MISMATCHES_SHOWN else "")


def _mismatch_message(path: Path, details: str) -> str:
    return (f"cannot resume from {path}: it holds the trainable parameters of a differently shaped model "
            f"({details}); the config changed since the checkpoint was saved. Start over with "
            "`--set checkpoint.resume=never` (replaces this output_dir's checkpoints and metrics), train in a new "
            "output_dir (`--set output_dir=...`), or resume with the config the checkpoint was saved with")
