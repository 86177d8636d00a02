"""The GPU-hour cost report of a run folder, from its ledger and, for SLURM jobs, from sacct.

Per attempt (one stage_start ... stage_end; a plain `mmtrain train` process without a runner is
its own attempt), in GPU-seconds:
- allocated: sacct's ElapsedRaw x gres/gpu of the job instance the attempt ran in (instance =
  the job block's `restart_count`); without a job id (a local run), the attempt's wall time x its
  GPUs. An instance shared by several attempts (one job running several stages) is split between
  them by their wall times; an instance of a known job with no attempt in the ledger (it died
  before the runner wrote anything) is its own `unrecorded` attempt, wasted in full.
- productive: the training time the run keeps x world size. It keeps what rank 0's process_end
  reports when training completed, stopped or was preempted (it checkpoints before exiting), else
  (failed, killed) what the attempt's last checkpoint record holds.
- wasted: 0 when the stage attempt ended `done` or `stopped`; else the allocation after the last
  checkpoint: allocated - (last checkpoint time - attempt start) x GPUs, within [0, allocated].
- interrupted: the whole allocation of attempts that did not end the stage (failed, preempted,
  killed, interrupted by a signal, unrecorded).
- overhead: allocated - productive - wasted (>= 0), split into measured startup, checkpoint and
  evaluation time (each x world size; evaluation tasks x their processes) and `other`.
docs/cost.md states the formulas and report.json's schema.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from mmtrain.cost import sacct as sacct_mod
from mmtrain.cost.hardware import normalise_gpu_type, peak_flops
from mmtrain.cost.ledger import LEDGER_FILE, read_ledger
from mmtrain.errors import UserError
from mmtrain.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

REPORT_DIR = "cost"
ESTIMATE_FILE = "cost_estimate.json"
SCHEMA_VERSION = 1
ENDED_STAGE = ("done", "stopped")
KEPT_PROCESS = ("completed", "stopped", "preempted")
STAGE_OUTCOME = {"completed": "done", "stopped": "stopped", "preempted": "preempted", "failed": "failed"}
OVERHEAD_PARTS = ("startup", "checkpoint", "eval", "other")

Query = Callable[[list[str]], dict[str, list[sacct_mod.SacctRow]]]


class ReportError(UserError, ValueError):
    """The run folder cannot be reported on (no ledger); the message says what is missing and why."""


@dataclass
class Attempt:
    """The ledger records of one attempt."""

    id: str
    stage: str
    variant: str | None
    job: dict[str, Any]
    start: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    process_starts: list[dict[str, Any]] = field(default_factory=list)
    process_ends: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def start_time(self) -> float:
        return float(self.start["time"]) if self.start else min(self.times)

    @property
    def last_time(self) -> float:
        """Time of the attempt's last record."""
        return max(self.times)

    @property
    def wall_s(self) -> float:
        """stage_end's wall_s; else (killed, or no runner) the last record's time - the start."""
        if self.end is not None and isinstance(self.end.get("wall_s"), (int, float)):
            return float(self.end["wall_s"])
        return max(0.0, self.last_time - self.start_time)

    @property
    def rank0_end(self) -> dict[str, Any] | None:
        ends = [r for r in self.process_ends if int(r.get("rank") or 0) == 0]
        return ends[-1] if ends else None

    @property
    def world_size(self) -> int | None:
        sizes = [int(r["world_size"]) for r in self.process_starts + self.process_ends + self.checkpoints
                 if isinstance(r.get("world_size"), int)]
        return max(sizes) if sizes else None


def time_split(process_end: dict[str, Any]) -> dict[str, Any]:
    """A process_end's startup_s/train_s/eval_s/checkpoint_s/wall_s (its `timing` block)."""
    timing = process_end.get("timing")
    return timing if isinstance(timing, dict) else {}


def gather_attempts(records: list[dict[str, Any]]) -> list[Attempt]:
    """The ledger's records grouped by attempt, in order of their start."""
    attempts: dict[str, Attempt] = {}
    for record in records:
        key = str(record.get("attempt"))
        attempt = attempts.get(key)
        if attempt is None:
            attempt = attempts[key] = Attempt(id=key, stage=str(record.get("stage")), variant=record.get("variant"),
                                              job=dict(record.get("job") or {}))
        if isinstance(record.get("time"), (int, float)):
            attempt.times.append(float(record["time"]))
        event = record["event"]
        if event == "stage_start":
            attempt.start = record
            attempt.stage, attempt.variant = str(record.get("stage")), record.get("variant")
            attempt.job = dict(record.get("job") or {})
        elif event == "stage_end":
            attempt.end = record
        elif event == "task":
            attempt.tasks.append(record)
        elif event == "process_start":
            attempt.process_starts.append(record)
        elif event == "process_end":
            attempt.process_ends.append(record)
        elif event == "checkpoint":
            attempt.checkpoints.append(record)
    found = [a for a in attempts.values() if a.times]
    return sorted(found, key=lambda a: a.start_time)


# ---------------------------------------------------------------------------------------------- building
def build_report(run: str | Path, price_per_gpu_hour: float | None = None, peak_tflops: float | None = None,
                 baseline: str | Path | None = None, wait_s: float = 0.0,
                 query: Query = sacct_mod.query_jobs) -> dict[str, Any]:
    """The report dict of `run` (docs/cost.md, "report.json"), with `baseline`'s totals and ratios if given.

    Raises:
        ReportError: a run folder without a ledger.
    """
    report = run_report(run, price_per_gpu_hour, peak_tflops, wait_s, query)
    report["baseline"] = None
    if baseline is not None:
        other = run_report(baseline, price_per_gpu_hour, peak_tflops, wait_s, query)
        keys = ("allocated_gpu_hours", "productive_gpu_hours", "flops", "cost")
        report["baseline"] = {
            "run": other["run"], "allocated_source": other["allocated_source"], "sacct": other["sacct"],
            "total": other["total"], "stages": other["stages"], "notes": other["notes"],
            "ratios": {key: _ratio(report["total"][key], other["total"][key]) for key in keys},
        }
    return report


def run_report(run: str | Path, price_per_gpu_hour: float | None = None, peak_tflops: float | None = None,
               wait_s: float = 0.0, query: Query = sacct_mod.query_jobs) -> dict[str, Any]:
    """The report of one run folder, without the baseline."""
    run = Path(run)
    ledger = run / LEDGER_FILE
    if not ledger.is_file():
        what = "is not a folder" if not run.is_dir() else f"has no {LEDGER_FILE}"
        raise ReportError(f"{ledger}: not found ({run} {what}); the ledger is written into the run folder by "
                          "`mmtrain run` (the pipeline's output_dir) and by `mmtrain train` (its output_dir)")
    attempts = gather_attempts(read_ledger(ledger))
    job_ids = sorted({str(a.job["job_id"]) for a in attempts if a.job.get("job_id")})
    notes: list[str] = []
    jobs: dict[str, list[sacct_mod.SacctRow]] = {}
    sacct_error = None
    if job_ids:
        try:
            if wait_s > 0:
                sacct_mod.wait_for_final(job_ids, wait_s, query=query)
                # While we waited, a requeued instance may have run and written its own records.
                attempts = gather_attempts(read_ledger(ledger))
                job_ids = sorted({str(a.job["job_id"]) for a in attempts if a.job.get("job_id")})
            jobs = query(job_ids)
        except sacct_mod.SacctUnavailable as exc:
            sacct_error = str(exc)
            notes.append(f"SLURM accounting unavailable ({exc}): allocated GPU time of the SLURM attempts "
                         "comes from the ledger (wall time x GPUs) instead")
    if not attempts:
        notes.append(f"{ledger} holds no records")
    rows, job_rows = _attempt_rows(attempts, jobs, sacct_error, peak_tflops, notes)
    sources = {r["allocated_source"] for r in rows}
    stages = []
    for name in dict.fromkeys(r["stage"] for r in rows):
        members = [r for r in rows if r["stage"] == name]
        variants = [{"variant": v, **_aggregate([r for r in members if r["variant"] == v], price_per_gpu_hour)}
                    for v in dict.fromkeys(r["variant"] for r in members)]
        has_variants = any(v["variant"] is not None for v in variants)
        stages.append({"stage": name, **_aggregate(members, price_per_gpu_hour),
                       "variants": variants if has_variants else []})
    return {
        "schema_version": SCHEMA_VERSION,
        "run": str(run),
        "ledger": str(ledger),
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "allocated_source": sources.pop() if len(sources) == 1 else ("mixed" if sources else None),
        "sacct": {"job_ids": job_ids, "used": bool(job_ids) and sacct_error is None, "error": sacct_error},
        "price_per_gpu_hour": price_per_gpu_hour,
        "peak_tflops": peak_tflops,
        "total": _aggregate(rows, price_per_gpu_hour),
        "stages": stages,
        "attempts": rows,
        "jobs": job_rows,
        "predicted": _predicted(run, stages, notes),
        "notes": notes,
    }


def _attempt_rows(attempts: list[Attempt], jobs: dict[str, list[sacct_mod.SacctRow]], sacct_error: str | None,
                  peak_tflops: float | None, notes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per attempt (plus unrecorded job instances) and one per SLURM job instance."""
    instances: dict[tuple[str, int], list[Attempt]] = {}
    for attempt in attempts:
        if attempt.job.get("job_id"):
            key = (str(attempt.job["job_id"]), int(attempt.job.get("restart_count") or 0))
            instances.setdefault(key, []).append(attempt)
    allocation: dict[str, dict[str, Any]] = {}
    job_rows = []
    for (job_id, index), members in instances.items():
        rows = jobs.get(job_id, [])
        if index >= len(rows):
            if sacct_error is None:
                notes.append(f"sacct has no instance {index} of job {job_id}: attempts "
                             f"{', '.join(a.id for a in members)} are counted from the ledger")
            continue
        row = rows[index]
        started = min(a.start_time for a in members)
        if not _covers(row, started):
            notes.append(f"sacct's instance {index} of job {job_id} ({row.start} to {row.end or 'now'}) does not "
                         f"span attempt {members[0].id}'s start ({_iso(started)}): a reused job id? Attempts "
                         f"{', '.join(a.id for a in members)} are counted from the ledger")
            continue
        gpus = row.gpus
        if gpus <= 0:
            from_ledger = next((int(a.job["gpus"]) for a in members if a.job.get("gpus")), None)
            gpus = from_ledger or 1
            notes.append(f"job {job_id} instance {index}: sacct shows no gres/gpu; counted with {gpus} GPU(s) "
                         + ("from the ledger's job block" if from_ledger else "(the ledger has no GPU count either)"))
        job_gpu_s = row.elapsed_s * gpus
        walls = [a.wall_s for a in members]
        if len(members) > 1:  # one job ran several stages (or a stage twice): split, so nothing counts twice
            notes.append(f"job {job_id} instance {index} ran {len(members)} attempts; its {job_gpu_s} GPU-seconds "
                         "are split between them by their wall times")
        for attempt, wall in zip(members, walls):
            share = wall / sum(walls) if sum(walls) > 0 else 1.0 / len(members)
            allocation[attempt.id] = {"gpu_s": job_gpu_s * share, "gpus": gpus, "source": "sacct", "sacct": row}
        job_rows.append(_job_row(row, index, gpus, [a.id for a in members], members[0].stage))
    out = [_attempt_row(a, allocation.get(a.id), peak_tflops, attempts) for a in attempts]
    matched = {str(a.job["job_id"]) for a in attempts if a.id in allocation}
    for job_id in sorted(matched):  # a job whose rows did not match the ledger may not be ours at all
        for index, row in enumerate(jobs.get(job_id, [])):
            if (job_id, index) in instances or row.elapsed_s <= 0:
                continue
            if row.state in ("RUNNING", "COMPLETING", "PENDING"):
                notes.append(f"job {job_id} instance {index} is {row.state} and has no stage_start yet: left out")
                continue
            known = [a for (j, i), group in instances.items() if j == job_id for a in group]
            gpus = row.gpus or next((int(a.job["gpus"]) for a in known if a.job.get("gpus")), 1)
            stage = min(known, key=lambda a: abs(int(a.job.get("restart_count") or 0) - index)).stage
            out.append(_unrecorded_row(row, index, gpus, stage))
            job_rows.append(_job_row(row, index, gpus, [], stage))
            notes.append(f"job {job_id} instance {index} ({row.state}, {row.elapsed_s} s) left no stage_start in the "
                         f"ledger; its {row.elapsed_s * gpus} GPU-seconds are counted as wasted in stage {stage}")
    job_rows.sort(key=lambda r: (int(r["job_id"]) if r["job_id"].isdigit() else 0, r["job_id"], r["instance"]))
    return out, job_rows


def _covers(row: sacct_mod.SacctRow, when: float, slack_s: float = 300.0) -> bool:
    """Whether the job instance ran at `when` (Unix seconds), give or take clock skew.

    sacct prints local times without a zone, as does datetime: both sides are read in this machine's zone.
    """
    try:
        start = datetime.fromisoformat(row.start).timestamp() if row.start else None
        end = datetime.fromisoformat(row.end).timestamp() if row.end else None
    except ValueError:
        return True  # an unfamiliar time format: nothing to check against
    if start is None:
        return False
    return start - slack_s <= when <= (end if end is not None else float("inf")) + slack_s


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when).isoformat(timespec="seconds")


def _job_row(row: sacct_mod.SacctRow, index: int, gpus: int, attempt_ids: list[str], stage: str) -> dict[str, Any]:
    return {"job_id": row.job_id_raw, "sacct_job_id": row.job_id, "instance": index, "elapsed_s": row.elapsed_s,
            "gpus": gpus, "gpu_s": row.elapsed_s * gpus, "state": row.state, "start": row.start, "end": row.end,
            "exit_code": row.exit_code, "stage": stage, "attempts": attempt_ids}


def _attempt_row(attempt: Attempt, allocation: dict[str, Any] | None, peak_tflops: float | None,
                 everyone: list[Attempt]) -> dict[str, Any]:
    """The attempt's GPU-seconds, what it kept, and its rates (see the module docstring)."""
    notes = []
    outcome = _outcome(attempt, allocation)
    if allocation is not None:
        gpus, allocated, source = allocation["gpus"], allocation["gpu_s"], "sacct"
    else:
        gpus = int(attempt.job.get("gpus") or attempt.world_size or 1)
        allocated, source = attempt.wall_s * gpus, "ledger"
        if attempt.start is None:
            notes.append("no stage_start (a training process run without the pipeline runner): wall time from "
                         "its first to its last record")
    kept, kept_from = _kept(attempt)
    world_size = int(kept.get("world_size") or attempt.world_size or gpus)
    productive = float(kept.get("train_s") or 0.0) * world_size
    if outcome in ENDED_STAGE or outcome == "running":
        wasted = 0.0
    else:
        kept_wall = (attempt.checkpoints[-1]["time"] - attempt.start_time) if attempt.checkpoints else 0.0
        wasted = min(max(allocated - kept_wall * gpus, 0.0), allocated)
    if productive > allocated - wasted + 1e-6:
        notes.append(f"productive time ({productive:.1f} GPU-s) exceeds allocated - wasted "
                     f"({allocated - wasted:.1f} GPU-s): more training processes than GPUs, or clocks that disagree")
    overhead = max(allocated - productive - wasted, 0.0)
    parts = _overhead_parts(attempt, overhead, world_size)
    precision = _precision(attempt, everyone)
    gpu_type = attempt.job.get("gpu_type") or (allocation["sacct"].gpu_type if allocation else None)
    peak = peak_flops(gpu_type, precision or "", peak_tflops) if (precision or peak_tflops is not None) else None
    memory, memory_kind = _peak_memory(attempt.process_ends)
    row = {
        "attempt": attempt.id, "stage": attempt.stage, "variant": attempt.variant,
        "job_id": str(attempt.job["job_id"]) if attempt.job.get("job_id") else None,
        "restart_count": int(attempt.job.get("restart_count") or 0) if attempt.job.get("job_id") else None,
        "host": attempt.job.get("host"), "start": attempt.start_time, "wall_s": round(attempt.wall_s, 3),
        "outcome": outcome, "gpus": gpus, "world_size": world_size,
        "gpu_type": normalise_gpu_type(gpu_type), "precision": precision, "peak_flops_per_gpu": peak,
        "allocated_source": source, "allocated_gpu_s": round(allocated, 3), "productive_gpu_s": round(productive, 3),
        "overhead_gpu_s": round(overhead, 3), "overhead_parts_gpu_s": {k: round(v, 3) for k, v in parts.items()},
        "wasted_gpu_s": round(wasted, 3),
        "interrupted_gpu_s": round(0.0 if outcome in ENDED_STAGE or outcome == "running" else allocated, 3),
        "kept_from": kept_from, "steps": int(kept.get("steps") or 0), "samples": int(kept.get("samples") or 0),
        "tokens": int(kept.get("tokens") or 0), "flops": float(kept.get("flops") or 0.0),
        "train_s": float(kept.get("train_s") or 0.0),
        "mfu": _mfu(float(kept.get("flops") or 0.0), productive, peak),
        "peak_memory_mib": memory, "peak_memory_kind": memory_kind, "notes": notes,
    }
    return row


def _unrecorded_row(row: sacct_mod.SacctRow, index: int, gpus: int, stage: str) -> dict[str, Any]:
    gpu_s = float(row.elapsed_s * gpus)
    return {
        "attempt": f"{row.job_id_raw}.{index}", "stage": stage, "variant": None, "job_id": row.job_id_raw,
        "restart_count": index, "host": None, "start": None, "wall_s": float(row.elapsed_s), "outcome": "unrecorded",
        "gpus": gpus, "world_size": 0, "gpu_type": normalise_gpu_type(row.gpu_type), "precision": None,
        "peak_flops_per_gpu": None, "allocated_source": "sacct", "allocated_gpu_s": gpu_s, "productive_gpu_s": 0.0,
        "overhead_gpu_s": 0.0, "overhead_parts_gpu_s": {k: 0.0 for k in OVERHEAD_PARTS}, "wasted_gpu_s": gpu_s,
        "interrupted_gpu_s": gpu_s, "kept_from": None, "steps": 0, "samples": 0, "tokens": 0, "flops": 0.0,
        "train_s": 0.0, "mfu": None, "peak_memory_mib": None, "peak_memory_kind": None,
        "notes": ["a job instance with no record in the ledger"],
    }


def _outcome(attempt: Attempt, allocation: dict[str, Any] | None) -> str:
    """stage_end's outcome; without one: the training process's (no runner), `running`, or `killed`."""
    if attempt.end is not None:
        return str(attempt.end.get("outcome") or "killed")
    if allocation is not None and allocation["sacct"].state in ("RUNNING", "COMPLETING", "PENDING"):
        return "running"
    end = attempt.rank0_end
    if attempt.start is None and end is not None:
        return STAGE_OUTCOME.get(str(end.get("outcome")), "failed")
    return "killed"


def _kept(attempt: Attempt) -> tuple[dict[str, Any], str | None]:
    """The counters the run keeps from this attempt, and where they come from."""
    end = attempt.rank0_end
    if end is not None and end.get("outcome") in KEPT_PROCESS:
        kept = dict(end)
        if "train_s" not in kept:
            kept["train_s"] = time_split(end).get("train_s", 0.0)
        return kept, "process_end"
    if attempt.checkpoints:
        return attempt.checkpoints[-1], "checkpoint"
    return {}, None


def _overhead_parts(attempt: Attempt, overhead: float, world_size: int) -> dict[str, float]:
    """Measured startup, checkpoint and eval GPU-seconds, capped in that order at the overhead; other = the rest."""
    end = attempt.rank0_end
    times = time_split(end) if end is not None else {}
    if end is None and attempt.checkpoints:
        times = {"checkpoint_s": attempt.checkpoints[-1].get("checkpoint_s", 0.0)}
    measured = {
        "startup": float(times.get("startup_s") or 0.0) * world_size,
        "checkpoint": float(times.get("checkpoint_s") or 0.0) * world_size,
        "eval": float(times.get("eval_s") or 0.0) * world_size
        + sum(float(t.get("wall_s") or 0.0) * int(t.get("nprocs") or 1)
              for t in attempt.tasks if str(t.get("kind", "")).startswith("eval:")),
    }
    parts, left = {}, overhead
    for name, value in measured.items():  # parts of an interrupted attempt may fall in its wasted time
        parts[name] = min(value, left)
        left -= parts[name]
    parts["other"] = left
    return parts


def _precision(attempt: Attempt, everyone: list[Attempt]) -> str | None:
    """Precision of the attempt's training, else of its stage's latest training (a killed attempt has none)."""
    for candidate in [attempt] + [a for a in reversed(everyone) if a.stage == attempt.stage]:
        ends = ([candidate.rank0_end] if candidate.rank0_end else []) + candidate.process_ends
        for end in ends:
            if end.get("precision"):
                return str(end["precision"])
    return None


def _peak_memory(ends: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    """Max over ranks of the peak GPU allocation (MiB), or of the peak RSS when no rank used a GPU."""
    for key, kind in (("peak_cuda_mib", "gpu"), ("peak_rss_mib", "rss")):
        values = [float(e["memory"][key]) for e in ends
                  if isinstance(e.get("memory"), dict) and isinstance(e["memory"].get(key), (int, float))]
        if values:
            return round(max(values), 1), kind
    values = [float(e["memory"]) for e in ends if isinstance(e.get("memory"), (int, float))]
    return (round(max(values), 1), "unknown") if values else (None, None)


def _mfu(flops: float, productive_gpu_s: float, peak: float | None) -> float | None:
    if peak is None or productive_gpu_s <= 0:
        return None
    return flops / (productive_gpu_s * peak)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _aggregate(rows: list[dict[str, Any]], price: float | None) -> dict[str, Any]:
    """Totals of attempt rows in GPU-hours, with tokens/s per GPU, MFU, peak memory and cost."""
    def total(key: str) -> float:
        return sum(r[key] for r in rows)

    productive = total("productive_gpu_s")
    working = [r for r in rows if r["productive_gpu_s"] > 0]
    # MFU over attempts with different peaks: FLOPs over the peak FLOPs their productive time could do.
    mfu = (total("flops") / sum(r["productive_gpu_s"] * r["peak_flops_per_gpu"] for r in working)
           if working and all(r["peak_flops_per_gpu"] for r in working) else None)
    memories = [r for r in rows if r["peak_memory_mib"] is not None]
    top = max(memories, key=lambda r: (r["peak_memory_kind"] == "gpu", r["peak_memory_mib"]), default=None)
    allocated_h = total("allocated_gpu_s") / 3600.0
    return {
        "allocated_gpu_hours": allocated_h,
        "productive_gpu_hours": productive / 3600.0,
        "overhead_gpu_hours": total("overhead_gpu_s") / 3600.0,
        "overhead_parts_gpu_hours": {k: sum(r["overhead_parts_gpu_s"][k] for r in rows) / 3600.0
                                     for k in OVERHEAD_PARTS},
        "wasted_gpu_hours": total("wasted_gpu_s") / 3600.0,
        "interrupted_gpu_hours": total("interrupted_gpu_s") / 3600.0,
        "attempts": len(rows),
        "preempted": sum(r["outcome"] == "preempted" for r in rows),
        "failed": sum(r["outcome"] == "failed" for r in rows),
        "killed": sum(r["outcome"] not in ENDED_STAGE + ("preempted", "failed", "running") for r in rows),
        "steps": int(total("steps")), "samples": int(total("samples")), "tokens": int(total("tokens")),
        "flops": total("flops"),
        "tokens_per_gpu_s": total("tokens") / productive if productive > 0 else None,
        "mfu": mfu,
        "peak_memory_mib": top["peak_memory_mib"] if top else None,
        "peak_memory_kind": top["peak_memory_kind"] if top else None,
        "cost": allocated_h * price if price is not None else None,
    }


def _predicted(run: Path, stages: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]] | None:
    """Predicted GPU-hours and memory per GPU of `<run>/cost_estimate.json` next to the actual, per stage."""
    path = run / ESTIMATE_FILE
    if not path.is_file():
        return None
    try:
        estimate = json.loads(path.read_text())
        predicted = list(estimate["stages"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"{path}: unreadable ({type(exc).__name__}: {exc}); predictions left out")
        return None
    actual = {s["stage"]: s for s in stages}
    out = []
    for entry in predicted:
        if not isinstance(entry, dict):
            continue
        name = str(entry.get("name"))
        have = actual.get(name, {})
        memory = have.get("peak_memory_mib")
        predicted_memory = entry.get("memory_per_gpu_gib")
        if isinstance(predicted_memory, dict):  # the estimate's breakdown by kind
            predicted_memory = predicted_memory.get("total")
        out.append({
            "stage": name,
            "predicted_gpu_hours": entry.get("gpu_hours"),
            "allocated_gpu_hours": have.get("allocated_gpu_hours"),
            "productive_gpu_hours": have.get("productive_gpu_hours"),
            "predicted_flops": entry.get("flops"),
            "flops": have.get("flops"),
            "predicted_memory_per_gpu_gib": predicted_memory,
            "peak_memory_gib": round(memory / 1024.0, 3) if memory is not None else None,
            "peak_memory_kind": have.get("peak_memory_kind"),
        })
    return out


# ---------------------------------------------------------------------------------------------- output
def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and report.png into `out_dir` (atomically); their paths."""
    out_dir = Path(out_dir)
    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json", "png": out_dir / "report.png"}
    atomic_write_text(paths["md"], format_markdown(report))
    atomic_write_json(paths["json"], report)
    atomic_write_bytes(paths["png"], plot_png(report))
    return paths


def _h(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) >= 1 else f"{value:.4g}"


def _num(value: float | int | None, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if value >= 0.01 else f"{value * 100:.2g}%"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _summary_cells(name: str, s: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{s[k]} {k}" for k in ("preempted", "failed", "killed") if s[k])
    memory = f"{s['peak_memory_mib']:,.0f} ({s['peak_memory_kind']})" if s["peak_memory_mib"] is not None else "-"
    return [name, f"{s['attempts']}" + (f" ({counts})" if counts else ""), _h(s["allocated_gpu_hours"]),
            _h(s["productive_gpu_hours"]), _h(s["overhead_gpu_hours"]), _h(s["wasted_gpu_hours"]),
            _h(s["interrupted_gpu_hours"]), _num(s["steps"]), _num(s["tokens"]), _num(s["flops"], ".3e"),
            _num(s["tokens_per_gpu_s"], ",.1f"), _pct(s["mfu"]), memory, _num(s["cost"], ",.2f")]


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: tables per stage, attempt, job, prediction and baseline, then the definitions."""
    source = {"sacct": "SLURM accounting (sacct: ElapsedRaw x gres/gpu)",
              "ledger": "the ledger (wall time x GPUs)",
              "mixed": "SLURM accounting where attempts ran as jobs, else the ledger"}.get(report["allocated_source"],
                                                                                        "nothing (no attempts)")
    parts = [f"# GPU cost of `{Path(report['run']).name}`", "",
             f"Run folder `{report['run']}`; allocated GPU time from {source}."]
    if report["sacct"]["error"]:
        parts.append(f"**sacct unavailable** ({report['sacct']['error']}): SLURM attempts are counted from the ledger.")
    header = ["stage", "attempts", "allocated GPU-h", "productive GPU-h", "overhead GPU-h", "wasted GPU-h",
              "interrupted GPU-h", "steps", "tokens", "FLOPs", "tokens/s/GPU", "MFU", "peak memory MiB", "cost"]
    lines = []
    for stage in report["stages"]:
        lines.append(_summary_cells(stage["stage"], stage))
        lines += [_summary_cells(f"{stage['stage']} / {v['variant']}", v) for v in stage["variants"]]
    lines.append(_summary_cells("**total**", report["total"]))
    parts += ["", "## Per stage", "", _table(header, lines)]

    lines = [[s["stage"], *(_h(s["overhead_parts_gpu_hours"][k]) for k in OVERHEAD_PARTS)]
             for s in report["stages"]]
    lines.append(["**total**", *(_h(report["total"]["overhead_parts_gpu_hours"][k]) for k in OVERHEAD_PARTS)])
    parts += ["", "## Overhead, GPU-hours", "", _table(["stage", *OVERHEAD_PARTS], lines)]

    lines = [[a["attempt"], a["stage"] + (f" / {a['variant']}" if a["variant"] else ""),
              f"{a['job_id']} ({a['restart_count']})" if a["job_id"] else "local", a["outcome"], str(a["gpus"]),
              f"{a['allocated_gpu_s']:,.1f} ({a['allocated_source']})", f"{a['productive_gpu_s']:,.1f}",
              f"{a['overhead_gpu_s']:,.1f}", f"{a['wasted_gpu_s']:,.1f}", f"{a['steps']} ({a['kept_from'] or '-'})"]
             for a in report["attempts"]]
    parts += ["", "## Attempts, GPU-seconds", "",
              _table(["attempt", "stage", "job (instance)", "outcome", "GPUs", "allocated", "productive", "overhead",
                      "wasted", "steps kept (from)"], lines)]

    if report["jobs"]:
        lines = [[j["sacct_job_id"], str(j["instance"]), j["state"], str(j["elapsed_s"]), str(j["gpus"]),
                  f"{j['gpu_s']:,}", j["start"] or "-", j["end"] or "-", ", ".join(j["attempts"]) or "(none)"]
                 for j in report["jobs"]]
        parts += ["", "## SLURM jobs", "", "GPU-seconds = ElapsedRaw x GPUs, job instance by job instance.", "",
                  _table(["job", "instance", "state", "ElapsedRaw s", "GPUs", "GPU-seconds", "start", "end",
                          "attempts"], lines)]

    if report["predicted"]:
        lines = [[p["stage"], _h(p["predicted_gpu_hours"]), _h(p["allocated_gpu_hours"]), _h(p["productive_gpu_hours"]),
                  _num(p["predicted_flops"], ".3e"), _num(p["flops"], ".3e"), _num(p["predicted_memory_per_gpu_gib"], ",.2f"),
                  _num(p["peak_memory_gib"], ",.2f") + (f" ({p['peak_memory_kind']})" if p["peak_memory_kind"] else "")]
                 for p in report["predicted"]]
        parts += ["", f"## Predicted ({ESTIMATE_FILE}) vs actual", "",
                  _table(["stage", "predicted GPU-h", "allocated GPU-h", "productive GPU-h", "predicted FLOPs",
                          "FLOPs", "predicted memory GiB/GPU", "peak memory GiB"], lines)]

    base = report.get("baseline")
    if base:
        ours, theirs = report["total"], base["total"]
        rows = [("allocated GPU-hours", "allocated_gpu_hours", _h), ("productive GPU-hours", "productive_gpu_hours", _h),
                ("FLOPs", "flops", lambda v: _num(v, ".3e")), ("cost", "cost", lambda v: _num(v, ",.2f"))]
        lines = [[label, fmt(ours[key]), fmt(theirs[key]), _num(base["ratios"][key], ".3f")] for label, key, fmt in rows]
        parts += ["", f"## Against the baseline `{base['run']}`", "",
                  _table(["", "this run", "baseline", "ratio run/baseline"], lines)]

    notes = report["notes"] + [f"attempt {a['attempt']}: {n}" for a in report["attempts"] for n in a["notes"]]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    parts += ["", "## Definitions", "", DEFINITIONS]
    return "\n".join(parts) + "\n"


DEFINITIONS = """\
- **Allocated GPU-hours**: per attempt, the GPU time the scheduler handed out. For a SLURM job: sacct's
  ElapsedRaw (seconds) x the job's gres/gpu, taken from the job instance the attempt ran in (its
  restart count); locally: the attempt's wall time x its GPUs. Divided by 3600.
- **Productive GPU-hours**: the training-loop time the run keeps (validation and checkpointing excluded)
  x the processes that trained. A completed, stopped or preempted training process keeps all of its time
  (a preempted one checkpoints before it exits); a failed or killed one keeps what its last checkpoint held.
- **Wasted GPU-hours**: allocation whose work was lost: for attempts that did not end their stage `done`
  or `stopped`, allocated - (time of the last checkpoint - attempt start) x GPUs, within [0, allocated].
  **Interrupted GPU-hours**: the whole allocation of those attempts (failed, preempted, interrupted, killed).
- **Overhead GPU-hours**: allocated - productive - wasted: startup (imports, model build, resume), checkpoint
  writing and evaluation (measured, x processes), and other (idle GPUs, launcher, scheduling gaps).
- **Tokens/s per GPU**: kept tokens / productive GPU-seconds.
- **MFU**: kept training FLOPs / (productive GPU-seconds x the GPU's dense peak FLOP/s at the run's precision).
- **FLOPs**: counted per component on one forward of the real shapes, times passes: 1 (forward), +1 for the
  backward when a trainable part sits in or before the component, + its trainable share for the weight
  gradients, +1 for the LLM under gradient checkpointing (frozen tower 1x, trainable projector 3x, frozen LLM
  after it 2x, fully trainable LLM 3x).
- **Cost**: allocated GPU-hours x the price per GPU-hour."""


def plot_png(report: dict[str, Any]) -> bytes:
    """Stacked horizontal bars of productive / overhead / wasted GPU-hours per stage, the total and the baseline."""
    # heavy: only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    # heavy: only when a plot is drawn
    import matplotlib.pyplot as plt

    bars = [(s["stage"], s) for s in report["stages"]] + [("total", report["total"])]
    if report.get("baseline"):
        bars.append((f"baseline: {Path(report['baseline']['run']).name}", report["baseline"]["total"]))
    bars.reverse()  # first stage on top
    height = 1.5 + 0.45 * len(bars)
    fig, ax = plt.subplots(figsize=(8, height))
    left = [0.0] * len(bars)
    for key, label, color in (("productive_gpu_hours", "productive", "tab:green"),
                              ("overhead_gpu_hours", "overhead", "tab:orange"),
                              ("wasted_gpu_hours", "wasted", "tab:red")):
        values = [s[key] for _, s in bars]
        ax.barh([name for name, _ in bars], values, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("GPU-hours")
    ax.set_title(f"{Path(report['run']).name}: allocated GPU-hours", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))  # room for the legend below the axis
    image = io.BytesIO()
    try:
        fig.savefig(image, format="png", dpi=110)
    finally:
        plt.close(fig)
    return image.getvalue()
