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
from mmtrain.engine.disk import OUT_OF_SPACE_ERRNOS, OutOfSpaceError
from mmtrain.engine.events import EvaluationEnd, Event, StepEnd
from mmtrain.utils.io import append_line, atomic_write_text


class MetricsLog:
    """Appends one JSON line per logged step to OUTPUT_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run logs them again) and any line cut short by a
        killed writer, rewriting the file atomically."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line, record in _parsed_lines(self.path.read_text()) if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` as one whole line (none at all when the disk is full: OutOfSpaceError)."""
        if not self.enabled:
            return
        try:
            append_line(self.path, json.dumps(record))
        except OSError as exc:
            if exc.errno not in OUT_OF_SPACE_ERRNOS:
                raise
            raise OutOfSpaceError(
                f"no disk space left to append to {self.path}: free space there, or move the run folder to a bigger "
                "disk and point output_dir at it; `checkpoint.resume=auto` then resumes from the last complete "
                "checkpoint") from exc

    def handle(self, event: Event) -> None:
        """Sink of the loop's events: logged step records and validation records."""
        if isinstance(event, StepEnd) and event.record is not None:
            self.log(event.record)
        elif isinstance(event, EvaluationEnd):
            self.log(event.record)

    def close(self) -> None:
        pass


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a line cut short by a killed writer is skipped)."""
    return [record for _, record in _parsed_lines((Path(output_dir) / METRICS_FILE).read_text())]


def _parsed_lines(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Each line of a JSONL text that holds one JSON object, with that object; other lines are left out."""
    parsed = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            parsed.append((line, record))
    return parsed


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
