"""Learning curves against compute, from a run's ledger: each validation with the FLOPs spent before it.

Training processes write a `validation` record after every validation (rank 0) with the attempt's
counters so far. Counters start at zero in every attempt; an attempt that resumed at step s adds
to what its stage had kept at step s (an earlier attempt's `checkpoint`, or its `process_end`, at
that step). A validation that a later attempt repeats (the earlier one was killed before it
checkpointed past it) counts once, with the later attempt's numbers: that is the work the stage
kept. Benchmarks compare methods in FLOPs from here rather than from their own FLOP models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtrain.cost.ledger import read_ledger

KEPT_OUTCOMES = ("completed", "stopped", "preempted")


@dataclass
class ComputePoint:
    """One validation of a stage, with the stage's cumulative training compute at that point."""

    stage: str
    step: int
    epoch: float | None
    flops: float
    """Training FLOPs of the stage up to this step (all ranks together)."""
    gpu_s: float
    """Productive GPU-seconds (training-loop seconds x ranks; processes on a CPU) up to this step."""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StageCompute:
    """A stage's kept training compute and its validations."""

    stage: str
    flops: float
    gpu_s: float
    steps: int
    points: list[ComputePoint]


def ledger_path(folder: str | Path) -> Path | None:
    """The ledger a run or stage folder's processes wrote to: its own, else its pipeline's (the parent's)."""
    folder = Path(folder)
    for candidate in (folder / "ledger.jsonl", folder.parent / "ledger.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def stage_of_folder(records: list[dict[str, Any]], folder: str | Path) -> str | None:
    """The ledger's stage name of the training processes whose output folder is `folder`."""
    target = Path(folder).resolve()
    for record in records:
        if record.get("event") == "process_start" and record.get("output_dir"):
            if Path(record["output_dir"]).resolve() == target:
                return record["stage"]
    return None


def _attempts(records: list[dict[str, Any]], stage: str) -> list[list[dict[str, Any]]]:
    """Rank 0's counter-carrying records of `stage`, grouped by attempt in order of first appearance."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("stage") != stage or record.get("rank", 0) != 0:
            continue
        if record.get("event") in ("checkpoint", "validation", "process_end") and "flops" in record:
            grouped.setdefault(record["attempt"], []).append(record)
    return list(grouped.values())


def stage_compute(records: list[dict[str, Any]], stage: str) -> StageCompute:
    """The stage's kept FLOPs and GPU-seconds, and its validations with the compute before each."""
    kept: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}  # step -> (flops, gpu-seconds) the stage kept there
    points: dict[int, ComputePoint] = {}
    for attempt in _attempts(records, stage):
        start = int(attempt[0].get("step_start", 0))
        base_step = max((s for s in kept if s <= start), default=0)
        base_flops, base_gpu_s = kept[base_step]
        for record in attempt:
            world = int(record.get("world_size", 1))
            flops = base_flops + float(record["flops"])
            gpu_s = base_gpu_s + float(record.get("train_s", 0.0)) * world
            step = int(record.get("step_end", record.get("step", start)))
            if record["event"] == "validation":
                step = int(record["step"])
                points[step] = ComputePoint(stage, step, record.get("epoch"), flops, gpu_s,
                                            dict(record.get("metrics", {})))
            elif record["event"] == "checkpoint" or record.get("outcome") in KEPT_OUTCOMES:
                kept[step] = (flops, gpu_s)
    last = max(kept)
    return StageCompute(stage, kept[last][0], kept[last][1], last, [points[s] for s in sorted(points)])


def folder_compute(folder: str | Path) -> StageCompute | None:
    """`stage_compute` of the training run or pipeline stage in `folder`; None when its ledger has no record of it."""
    path = ledger_path(folder)
    if path is None:
        return None
    records = read_ledger(path)
    stage = stage_of_folder(records, folder)
    return stage_compute(records, stage) if stage is not None else None
