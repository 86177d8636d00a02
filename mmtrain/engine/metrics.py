"""Run-folder records: metrics.jsonl (one object per logged step, a sink of the loop's events), per-rank
memory reports."""

from __future__ import annotations

import ctypes
import json
import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtrain.config.paths import METRICS_FILE
from mmtrain.engine.events import EvaluationEnd, Event, StepEnd
from mmtrain.utils.io import append_line, atomic_write_text


class MetricsLog:
    """Appends one JSON line per logged step to OUTPUT_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run logs them again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record))

    def handle(self, event: Event) -> None:
        """Sink of the loop's events: logged step records and validation records."""
        if isinstance(event, StepEnd) and event.record is not None:
            self.log(event.record)
        elif isinstance(event, EvaluationEnd):
            self.log(event.record)

    def close(self) -> None:
        pass


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def local_parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per component: full element count and the elements/bytes this rank actually holds.

    Under ZeRO-3 a rank holds `ds_tensor` (its partition) instead of the full parameter.
    """
    report: dict[str, dict[str, int]] = {}
    for name, module in model.components().items():
        full = local = local_bytes = 0
        for p in module.parameters():
            held = getattr(p, "ds_tensor", None)
            if held is None or getattr(p, "ds_persist", False):
                held = p.data  # not partitioned, or small enough that ZeRO-3 keeps it whole
            full += int(getattr(p, "ds_numel", p.numel()))
            local += held.numel()
            local_bytes += held.numel() * held.element_size()
        report[name] = {"numel": full, "local_numel": local, "local_bytes": local_bytes}
    return report


def peak_memory() -> dict[str, float]:
    """Memory of this process in MiB: peak and current RSS, current PSS, peak CUDA allocation.

    RSS counts shared pages (e.g. a memory-mapped checkpoint read by every rank) in full in each
    process; PSS splits them between the processes that share them, so it adds up across ranks.
    """
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    _release_free_heap()
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                out[f"{key.lower()}_mib"] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise), so RSS/PSS show live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
