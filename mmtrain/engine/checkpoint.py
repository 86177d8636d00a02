"""Checkpoints: trainable-only safetensors + a DeepSpeed resume state, written atomically.

Layout of one checkpoint, `OUTPUT_DIR/checkpoints/step_00000040/`:
- `trainable.safetensors`: the trainable parameters only, gathered under ZeRO-3; loads without
  DeepSpeed (`mmtrain.models.load_trainable_weights`). The frozen LLM is never copied.
- `ds/`: DeepSpeed's state of the trainable part (optimizer partitions, LR scheduler, client
  state) for an exact resume, saved with `exclude_frozen_parameters=True`.
- `meta.json`: step and bookkeeping, written last.
Everything is written under `step_XXXXXXXX.tmp/` and renamed when complete, so a job killed
mid-save leaves only a `.tmp` folder that is never picked up (and is cleared by the next save). Old
checkpoints are renamed to `step_XXXXXXXX.deleting` before they are deleted, so a kill mid-deletion
never leaves a half-deleted folder that looks complete.

Before anything is written, every rank checks that the file system under output_dir has room for the
checkpoint and the ranks agree on the verdict (`ensure_room`): a full disk stops all of them with the
same `CheckpointSpaceError`, naming the folder and the space needed, instead of leaving the others
waiting in a barrier until the process-group timeout.
"""

from __future__ import annotations

import json
import re
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
    RunDir,
    checkpoint_dir,
    complete_checkpoints,
    latest_checkpoint,
)
from mmtrain.engine.disk import (
    OutOfSpaceError,
    folder_bytes,
    free_bytes,
    human_bytes,
    is_out_of_space,
)
from mmtrain.errors import UserError
from mmtrain.utils.io import atomic_write_json

__all__ = ["DS_TAG", "META_FILE", "TRAINABLE_FILE", "CheckpointMismatchError", "CheckpointSpaceError",
           "ResumeCheckpointError", "check_checkpoint_fits", "checkpoint_dir", "complete_checkpoints",
           "ensure_room", "estimate_checkpoint_bytes", "latest_checkpoint", "load_checkpoint", "remove_unfinished",
           "resolve_resume", "save_checkpoint", "trainable_state_dict"]
_GATHER_CHUNK = 50_000_000
_MISMATCHES_SHOWN = 3
TMP_SUFFIX = ".tmp"
DELETING_SUFFIX = ".deleting"
_UNFINISHED = re.compile(r"^step_\d{8}\.(tmp|deleting)$")
_OPTIMIZER_BYTES = 12
"""Per trainable parameter: DeepSpeed's fp32 master copy and Adam's two fp32 moments."""
_FIRST_ESTIMATE_SLACK = 1.10
_FIRST_ESTIMATE_OVERHEAD_BYTES = 128 << 10
"""DeepSpeed's helper scripts (zero_to_fp32.py...), file headers and meta.json."""
_NEXT_ESTIMATE_SLACK = 1.05
_WRITE_OK, _WRITE_OUT_OF_SPACE, _WRITE_FAILED = 0, 1, 2



class ResumeCheckpointError(UserError, FileNotFoundError):
    """`checkpoint.resume` names a folder that is not a complete mmtrain checkpoint."""


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint to resume from holds trainable parameters of another model (other names or shapes)."""


class CheckpointSpaceError(OutOfSpaceError):
    """The file system under output_dir has no room for the next checkpoint."""


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
    """Save a complete checkpoint for `step` (collective: every rank must call it).

    Raises:
        CheckpointSpaceError: on every rank together, before anything is written, when the file system lacks
            room for it (`ensure_room`); also when a write runs out of space anyway (the estimate was low),
            after its unfinished folder is removed. Rank 0's own writes (weights, meta.json) fail on every
            rank together; a write inside DeepSpeed's save fails on its rank, whose launcher stops the others.
    """
    # heavy; imported where used, once the accelerator is chosen
    import deepspeed.comm as dist

    rank = dist.get_rank()
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if rank == 0:
        remove_unfinished(final.parent)
    dist.barrier()
    need = ensure_room(engine, output_dir, step)
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        state = trainable_state_dict(engine.module, rank)
    except Exception as exc:
        if is_out_of_space(exc, tmp):
            raise CheckpointSpaceError(_ran_out_message(output_dir, step, need, _discard(tmp))) from exc
        raise
    failure = _write_weights_and_meta(tmp, step, state, client_state) if rank == 0 else None
    _agree_on_writes(failure, tmp, output_dir, step, need, engine.device)
    if rank == 0:
        if final.exists():
            _remove_checkpoint(final)
        tmp.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            _remove_checkpoint(old)
    dist.barrier()
    return final


def ensure_room(engine, output_dir: str | Path, step: int) -> int:
    """Agree on every rank, before anything is written, that checkpoint `step` fits; returns the bytes it needs.

    Each rank estimates the whole checkpoint (`estimate_checkpoint_bytes`: ranks on one node, or on a shared
    file system, write into the same free space) and reads the free space of the file system it sees under
    output_dir. One all-reduce gives every rank the largest estimate and the smallest free space, so either
    all go on or all raise the same CheckpointSpaceError.
    """
    # heavy; imported where used, once the accelerator is chosen
    import deepspeed.comm as dist

    numbers = torch.tensor([float(estimate_checkpoint_bytes(engine.module, output_dir)),
                            -float(free_bytes(RunDir(output_dir).checkpoints))], dtype=torch.float64,
                           device=engine.device)
    dist.all_reduce(numbers, op=dist.ReduceOp.MAX)
    need, free = int(numbers[0]), int(-numbers[1])
    if need > free:
        raise CheckpointSpaceError(_no_room_message(output_dir, step, need, free))
    return need


def estimate_checkpoint_bytes(model: nn.Module, output_dir: str | Path) -> int:
    """Bytes the next checkpoint of `model` in `output_dir` will take.

    The last complete checkpoint's size plus 5% when there is one; before the first, from the trainable
    parameters: their weights twice (trainable.safetensors and DeepSpeed's module state), an fp32 master
    copy and Adam's two fp32 moments, plus 10% and 128 KiB for headers and DeepSpeed's helper scripts.
    """
    last = latest_checkpoint(output_dir)
    if last is not None:
        return int(folder_bytes(last) * _NEXT_ESTIMATE_SLACK)
    per_parameters = sum(int(getattr(p, "ds_numel", p.numel())) * (2 * p.element_size() + _OPTIMIZER_BYTES)
                         for p in model.parameters() if p.requires_grad)
    return int(per_parameters * _FIRST_ESTIMATE_SLACK) + _FIRST_ESTIMATE_OVERHEAD_BYTES


def remove_unfinished(checkpoints: Path) -> None:
    """Delete what killed or failed saves left in a checkpoints folder (`.tmp` and `.deleting` folders)."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        if _UNFINISHED.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _write_weights_and_meta(tmp: Path, step: int, state: dict[str, torch.Tensor],
                            client_state: dict[str, Any]) -> Exception | None:
    """Rank 0's part of a save: the gathered trainable weights, then meta.json; the error if a write failed."""
    try:
        save_file(state, str(tmp / TRAINABLE_FILE), metadata={"format": "pt", "step": str(step)})
        atomic_write_json(tmp / META_FILE, {"step": step, "trainable": sorted(state), **client_state})
    except Exception as exc:  # noqa: BLE001 (any failure must reach the all-reduce, or the other ranks hang)
        return exc
    return None


def _agree_on_writes(failure: Exception | None, tmp: Path, output_dir: str | Path, step: int, need: int,
                     device) -> None:
    """Tell every rank whether rank 0's writes failed (an all-reduce in place of a barrier), so all raise together.

    Rank 0 removes the unfinished folder and raises its own error (a CheckpointSpaceError when the disk was
    full); the other ranks raise a CheckpointSpaceError, or a RuntimeError pointing at rank 0's log.
    """
    # heavy; imported where used, once the accelerator is chosen
    import deepspeed.comm as dist

    code = _WRITE_OK if failure is None else _WRITE_OUT_OF_SPACE if is_out_of_space(failure, tmp) else _WRITE_FAILED
    verdict = torch.tensor([float(code)], dtype=torch.float64, device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    code = int(verdict[0])
    if code == _WRITE_OK:
        return
    written = _discard(tmp) if failure is not None else None
    if code == _WRITE_OUT_OF_SPACE:
        raise CheckpointSpaceError(_ran_out_message(output_dir, step, need, written)) from failure
    if failure is not None:
        raise failure
    raise RuntimeError(f"rank 0 could not write checkpoint {tmp}; its log holds the error")


def _discard(tmp: Path) -> int:
    """Remove an unfinished checkpoint folder so that it does not keep the disk full; returns the bytes it held."""
    written = folder_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return written


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, renaming it first: a kill mid-deletion never leaves one that looks complete."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _no_room_message(output_dir: str | Path, step: int, need: int, free: int) -> str:
    folder = RunDir(output_dir).checkpoints
    return (f"not enough disk space for checkpoint {checkpoint_dir(output_dir, step).name} in {folder}: it needs "
            f"about {human_bytes(need)} and the file system has {human_bytes(free)} free. Free at least "
            f"{human_bytes(need - free)} there (other files, or older checkpoints with a lower "
            "checkpoint.keep_last), or move the run folder to a bigger disk and point output_dir at it. Nothing "
            f"of this checkpoint was written; {_resume_hint(output_dir)}")


def _ran_out_message(output_dir: str | Path, step: int, need: int, written: int | None) -> str:
    folder = RunDir(output_dir).checkpoints
    progress = f" after {human_bytes(written)}" if written else ""
    return (f"ran out of disk space writing checkpoint {checkpoint_dir(output_dir, step).name} in {folder}"
            f"{progress} (it was expected to need about {human_bytes(need)}; {human_bytes(free_bytes(folder))} "
            "are free now that its unfinished folder is removed). Free more space there (other files, or older "
            "checkpoints with a lower checkpoint.keep_last), or move the run folder to a bigger disk and point "
            f"output_dir at it; {_resume_hint(output_dir)}")


def _resume_hint(output_dir: str | Path) -> str:
    last = latest_checkpoint(output_dir)
    if last is None:
        return "there is no complete checkpoint yet, so a rerun starts over"
    return f"the last complete checkpoint, {last.name}, is intact and `checkpoint.resume=auto` resumes from it"


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
