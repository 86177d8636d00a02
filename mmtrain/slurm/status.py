"""`mmtrain status RUN`: each submitted stage's jobs and their states, from sacct (and squeue's reasons).

A failed stage is named with its exit code and where its logs are (the job's SLURM log and the
stage's own `logs/train.log`), together with the stages cancelled because they waited for it. Earlier
instances of a requeued job (preempted, or ended by a node failure) are listed as notes, with the
node the runner saw lost and the step it resumed from.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from mmtrain.cost.ledger import LEDGER_FILE, read_ledger
from mmtrain.cost.sacct import ACTIVE_STATES, SacctRow, SacctUnavailable, query_jobs
from mmtrain.errors import UserError
from mmtrain.pipeline.state import read_json
from mmtrain.slurm.submit import dependents, read_jobs

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class StatusError(UserError, RuntimeError):
    """The run's status cannot be shown: it was not submitted with `mmtrain submit` (RUN is not its
    folder), or SLURM accounting (sacct) cannot be read here; the message says which."""


def stage_jobs(record: dict[str, Any]) -> dict[str, list[SacctRow]]:
    """sacct rows of each submitted stage, keyed by stage name (every array task and requeue)."""
    ids = [entry["job_id"] for entry in record["stages"] if entry.get("job_id")]
    rows = query_jobs(ids)
    out: dict[str, list[SacctRow]] = {}
    for entry in record["stages"]:
        job_id = entry.get("job_id")
        if not job_id:
            continue
        out[entry["name"]] = [row for instances in rows.values() for row in instances
                              if row.job_id == job_id or row.job_id.startswith(f"{job_id}_")
                              or row.job_id_raw == job_id]
    return out


def queued_jobs(job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """squeue's state and reason (`Dependency`, `BeginTime`, ...) of each job or array task still queued.

    squeue is the live view: a job requeued after a node failure is PENDING here while sacct may still
    show only the instance that ended."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    result = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True,
                            text=True, timeout=60)
    queued = {}
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            queued[parts[0]] = (parts[1], parts[2] if parts[2] not in ("None", "") else None)
    return queued


def summarise(record: dict[str, Any], jobs: dict[str, list[SacctRow]],
              queued: dict[str, tuple[str, str | None]], ledger: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per stage: job id, state(s), restarts, log, notes on earlier instances; plus which stage failed and
    what it took down. `queued`: squeue's (state, reason) of the jobs still queued, which wins over an
    ended instance in sacct (a requeue in progress); `ledger`: the run's ledger records (what the
    runner saw when a node was lost)."""
    stages = []
    failed = []
    reasons = {job: reason for job, (_, reason) in queued.items() if reason}
    for entry in record["stages"]:
        rows = jobs.get(entry["name"], [])
        latest = _latest_per_task(rows)
        live = {r.job_id: queued[r.job_id][0] for r in latest if r.job_id in queued and r.state not in ACTIVE_STATES}
        states = sorted({live.get(r.job_id, r.state) for r in latest})
        ended = [r for r in rows if r not in latest or r.job_id in live]  # instances that were requeued
        row = {"name": entry["name"], "job_id": entry.get("job_id"), "array": entry.get("array"),
               "states": states or (["NOT SUBMITTED"] if not entry.get("job_id") else ["UNKNOWN"]),
               "tasks": {r.job_id: live.get(r.job_id, r.state) for r in latest}, "restarts": len(ended),
               "elapsed_s": sum(r.elapsed_s for r in rows),
               "reason": next((v for k, v in reasons.items() if k.split("_")[0] == entry.get("job_id")), None),
               "slurm_logs": [str(p) for p in _slurm_logs(entry, latest)],
               "stage_folders": entry.get("stage_folders", []),
               "notes": _requeued_instances(entry["name"], rows, ended, ledger or [])}
        stages.append(row)
        ran_and_failed = [r for r in latest if r.state in FAILED_STATES and r.elapsed_s > 0 and r.job_id not in live]
        if ran_and_failed:
            failed.append(row)
    for row in failed:
        row["message"] = _failure_message(row, record, stages)
    final = bool(jobs) and all(not (set(s["states"]) & ACTIVE_STATES) and "UNKNOWN" not in s["states"]
                               for s in stages if s["job_id"])
    ok = final and all(s["states"] == ["COMPLETED"] for s in stages if s["job_id"])
    return {"run": record["output_dir"], "recipe": record["recipe"], "submitted_at": record["submitted_at"],
            "stages": stages, "final": final, "ok": ok, "failed": [s["name"] for s in failed]}


def _requeued_instances(stage: str, rows: list[SacctRow], ended: list[SacctRow],
                        ledger: list[dict[str, Any]]) -> list[str]:
    """One line per instance in `ended` (it ended and its job was requeued), with the lost node the runner
    recorded, if any."""
    lost = [r for r in ledger if r.get("event") == "stage_end" and r.get("stage") == stage
            and r.get("outcome") == "node_lost"]
    notes = []
    for row in ended:
        note = f"job {row.job_id} ended {row.state} after {row.elapsed_s} s and was requeued"
        seen = [r for r in lost if (r.get("job") or {}).get("job_id") == row.job_id_raw
                and (r.get("job") or {}).get("restart_count", 0) == _instance(row, rows)]
        if seen and seen[0].get("message"):
            note += f": {seen[0]['message']}"
        notes.append(note)
    return notes


def _instance(row: SacctRow, rows: list[SacctRow]) -> int:
    """The row's instance number within its task (SLURM_RESTART_COUNT of that run)."""
    return [r for r in rows if r.job_id == row.job_id].index(row)


def _latest_per_task(rows: list[SacctRow]) -> list[SacctRow]:
    latest: dict[str, SacctRow] = {}
    for row in rows:  # rows of one task are in start order: the last is the current instance
        latest[row.job_id] = row
    return list(latest.values())


def _slurm_logs(entry: dict[str, Any], rows: list[SacctRow]) -> list[Path]:
    folder = Path(entry["log"])
    prefix = Path(entry["script"]).stem
    return [folder / f"{prefix}-{row.job_id}.out" for row in rows]


def _failure_message(row: dict[str, Any], record: dict[str, Any], stages: list[dict[str, Any]]) -> str:
    details = []
    for folder in row["stage_folders"]:
        stage_record = read_json(Path(folder) / "stage.json") or {}
        if stage_record.get("message"):
            details.append(stage_record["message"])
    logs = ", ".join(row["slurm_logs"]) or "(no SLURM log)"
    waiting = [s for s in stages if s["name"] in {d["name"] for d in dependents(record, row["name"])}]
    cancelled = ", ".join(f"{s['name']} (job {s['job_id']}: {'/'.join(s['states'])})" for s in waiting)
    text = f"stage {row['name']} failed (job {row['job_id']}: {'/'.join(row['states'])}); SLURM log: {logs}"
    if details:
        text += "; " + "; ".join(details)
    if cancelled:
        text += f"; stages waiting for it: {cancelled}"
    return text


def format_status(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['run']} (recipe {summary['recipe']}, submitted {summary['submitted_at']})"]
    header = ("stage", "job", "state", "restarts", "elapsed", "note")
    table = [header]
    for s in summary["stages"]:
        states = "/".join(s["states"])
        if len(s["tasks"]) > 1:
            states += f" ({len(s['tasks'])} tasks)"
        table.append((s["name"], str(s["job_id"] or "-"), states, str(s["restarts"]), f"{s['elapsed_s']}s",
                      s["reason"] or ""))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    for s in summary["stages"]:
        for note in s.get("notes", []):
            lines.append(f"note: stage {s['name']}: {note}")
        if s.get("message"):
            lines.append(f"error: {s['message']}")
    return "\n".join(lines)


def run_status(run_dir: str | Path, wait_s: float = 0.0, poll_s: float = 5.0) -> dict[str, Any]:
    """The run's status; with `wait_s`, poll until every job is final (or the time is up).

    Raises:
        StatusError: RUN holds no `slurm/jobs.json`, or sacct cannot be read.
    """
    record = read_jobs(run_dir)
    if record is None:
        raise StatusError(f"{Path(run_dir) / 'slurm' / 'jobs.json'} not found: this run was not submitted "
                          "with `mmtrain submit` (or RUN is not its output folder)")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            jobs = stage_jobs(record)
        except SacctUnavailable as exc:
            raise StatusError(f"cannot read job states: {exc}") from None
        ids = [e["job_id"] for e in record["stages"] if e.get("job_id")]
        summary = summarise(record, jobs, queued_jobs(ids), read_ledger(Path(run_dir) / LEDGER_FILE))
        if summary["final"] or time.monotonic() >= deadline:
            return summary
        time.sleep(poll_s)
