"""Every path mmtrain reads or writes by convention: the cache root and the layout of a run folder.

One source of truth: code asks a `RunDir` for `checkpoints/step_00000010`, `config.yaml` or the
ledger instead of spelling the names itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "MMTRAIN_CACHE"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LEDGER_FILE = "ledger.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
TENSORBOARD_DIR = "tensorboard"
SKIPPED_FILE = "skipped.jsonl"
PARAMS_FILE = "params.txt"
RUN_INFO_FILE = "run_info.json"
RANKS_DIR = "ranks"


def cache_dir() -> Path:
    """Root of everything mmtrain prepares: `MMTRAIN_CACHE`, default `~/.cache/mmtrain`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mmtrain"))


def checkpoint_name(step: int) -> str:
    """`step_00000010` for step 10."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


@dataclass(frozen=True)
class RunDir:
    """The files of one training run's output folder (`output_dir`)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        """The resolved run config, written when the run starts."""
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def ledger(self) -> Path:
        """The cost ledger of a run trained on its own (a pipeline's runs share the pipeline's)."""
        return self.root / LEDGER_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def skipped(self) -> Path:
        """Bad samples skipped under `data.bad_samples: skip`."""
        return self.root / SKIPPED_FILE

    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO_FILE

    def rank_report(self, rank: int) -> Path:
        return self.root / RANKS_DIR / f"rank{rank}.json"


# ------------------------------------------------------------------------- checkpoints
TRAINABLE_FILE = "trainable.safetensors"
"""A checkpoint's trainable weights (safetensors; names = the VLM's parameter names)."""
META_FILE = "meta.json"
"""A checkpoint's step and bookkeeping, written last: its presence marks a complete checkpoint."""
DS_TAG = "ds"
"""A checkpoint's DeepSpeed resume state (a sub-folder)."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return RunDir(output_dir).checkpoint(step)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder (renamed into place, with meta.json), oldest first."""
    root = RunDir(output_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None
