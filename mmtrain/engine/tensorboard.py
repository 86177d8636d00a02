"""TensorBoard: the training loop's scalars as event files under `<run>/tensorboard/` (`logging.tensorboard: true`).

Rank 0 writes every number of each metrics record (`train/loss`, `train/lr`, `train/grad_norm`,
`val/val_loss`...) at its global step, so `tensorboard --logdir runs/` shows the same curves as
`metrics.jsonl`. Like that file, a resumed run drops what an earlier invocation logged after the
step it resumes from (TensorBoard's `purge_step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmtrain.engine.events import EvaluationEnd, Event, LoopStart, StepEnd

TRAIN_PREFIX = "train/"
VALIDATION_PREFIX = "val/"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record (the step itself and nested groups left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Writes training and validation records as TensorBoard scalars (rank 0 only)."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self._writer = None

    def handle(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, LoopStart):
            # imports tensorboard: only when logging.tensorboard is on
            from torch.utils.tensorboard import SummaryWriter

            # Events an earlier invocation logged after the step this one starts from are dropped.
            self._writer = SummaryWriter(log_dir=str(self.folder), purge_step=event.step + 1)
        if self._writer is None:
            return
        if isinstance(event, StepEnd) and event.record is not None:
            self._write(TRAIN_PREFIX, event.step, event.record)
            for name, lr in (event.record.get("lr_groups") or {}).items():
                self._writer.add_scalar(f"{TRAIN_PREFIX}lr_{name}", lr, event.step)
        elif isinstance(event, EvaluationEnd):
            self._write(VALIDATION_PREFIX, event.step, event.record)
            self._writer.flush()

    def _write(self, prefix: str, step: int, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self._writer.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
