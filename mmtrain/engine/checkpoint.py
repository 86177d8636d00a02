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
from torch import nn

from mmtrain.config.paths import (DS_TAG, META_FILE, TRAINABLE_FILE, checkpoint_dir, complete_checkpoints,
                                  latest_checkpoint)
from mmtrain.utils.io import atomic_write_json

__all__ = ["DS_TAG", "META_FILE", "TRAINABLE_FILE", "checkpoint_dir", "complete_checkpoints", "latest_checkpoint",
           "load_checkpoint", "resolve_resume", "save_checkpoint", "trainable_state_dict"]
_GATHER_CHUNK = 50_000_000


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from for `checkpoint.resume` (`auto`, `never` or a folder)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / META_FILE).is_file() or not (path / DS_TAG).is_dir():
        raise FileNotFoundError(
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
    import deepspeed.comm as dist
    from safetensors.torch import save_file

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
    """Restore the DeepSpeed state from a checkpoint folder; returns its client state."""
    load_path, client_state = engine.load_checkpoint(
        str(path), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_TAG}")
    meta = json.loads((path / META_FILE).read_text())
    return {**meta, **(client_state or {})}
