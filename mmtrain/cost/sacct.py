"""SLURM accounting for the cost report: what `sacct` says each job instance was allocated.

`query_jobs` runs

    sacct -n -P -X -D -S 2000-01-01 -j ID1,ID2 --format=JobIDRaw,JobID,State,ElapsedRaw,AllocTRES,Start,End,ExitCode

`-X` keeps the allocation line (no steps), `-D` lists every instance of a requeued job as its own
row (the earlier ones in state REQUEUED), `-S` reaches back past today (sacct's default start is
midnight). Rows are grouped by JobIDRaw (the `SLURM_JOB_ID` a job, or an array task, sees) and
sorted by Start, so index i is the job's instance with `SLURM_RESTART_COUNT` = i.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

FORMAT = "JobIDRaw,JobID,State,ElapsedRaw,AllocTRES,Start,End,ExitCode"
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED",
                           "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"})
_GPU_TRES = re.compile(r"^gres/gpu(?::([^=]+))?=(\d+)$")
_NODE_TRES = re.compile(r"^node=(\d+)$")


class SacctUnavailable(RuntimeError):
    """sacct is not installed, or failed; the message says why."""


@dataclass
class SacctRow:
    """One instance of one job (one allocation) as SLURM's accounting records it."""

    job_id_raw: str
    job_id: str
    """As sacct shows it: `123`, or `122_4` for an array task."""
    state: str
    """First word of sacct's State: `CANCELLED by 0` -> `CANCELLED`."""
    elapsed_s: int
    gpus: int
    """gres/gpu of AllocTRES (0 when absent)."""
    gpu_type: str | None
    """TYPE of a `gres/gpu:TYPE=N` entry, if any."""
    nodes: int
    """node= of AllocTRES: how many nodes the allocation spanned (0 before it started)."""
    start: str | None
    end: str | None
    """ISO times; None where sacct says Unknown/None (not started, still running)."""
    exit_code: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_sacct(text: str) -> dict[str, list[SacctRow]]:
    """Rows of `sacct -n -P` output in FORMAT's columns, grouped by JobIDRaw, each list sorted by Start."""
    jobs: dict[str, list[SacctRow]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 8:
            raise SacctUnavailable(f"unexpected sacct line (want {FORMAT}): {line!r}")
        raw, job_id, state, elapsed, tres, start, end, exit_code = fields[:8]
        gpus, gpu_type = _gpus(tres)
        jobs.setdefault(raw, []).append(SacctRow(
            job_id_raw=raw, job_id=job_id, state=(state.split() or ["UNKNOWN"])[0], elapsed_s=_int(elapsed),
            gpus=gpus, gpu_type=gpu_type, nodes=_nodes(tres), start=_time(start), end=_time(end),
            exit_code=exit_code))
    for rows in jobs.values():
        # Not started yet (a requeued instance waiting) sorts last; ISO times sort as strings.
        rows.sort(key=lambda r: (r.start is None, r.start or ""))
    return jobs


def _gpus(tres: str) -> tuple[int, str | None]:
    """(count, type) of GPUs in AllocTRES; a typed entry wins over the untyped total when both appear."""
    count = 0
    for item in tres.split(","):
        match = _GPU_TRES.match(item.strip())
        if match:
            if match.group(1):
                return int(match.group(2)), match.group(1)
            count = int(match.group(2))
    return count, None


def _nodes(tres: str) -> int:
    for item in tres.split(","):
        match = _NODE_TRES.match(item.strip())
        if match:
            return int(match.group(1))
    return 0


def _int(text: str) -> int:
    return int(text) if text.strip().isdigit() else 0


def _time(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "Unknown", "None") else text


def query_jobs(job_ids: list[str]) -> dict[str, list[SacctRow]]:
    """sacct's rows of these jobs (see the module docstring); raises SacctUnavailable with the reason."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    if shutil.which("sacct") is None:
        raise SacctUnavailable("sacct is not installed here (no SLURM accounting)")
    command = ["sacct", "-n", "-P", "-X", "-D", "-S", "2000-01-01", "-j", ",".join(ids), f"--format={FORMAT}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SacctUnavailable(f"sacct did not run: {exc}") from None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise SacctUnavailable(f"sacct failed (exit {done.returncode}): {reason[-1] if reason else 'no message'}")
    return parse_sacct(done.stdout)


def is_final(jobs: dict[str, list[SacctRow]], job_ids: list[str]) -> bool:
    """Every job has a row and no row is still pending, running or being requeued.

    A REQUEUED row followed by a later instance is final (that instance ended in a requeue); only a
    job whose last row is REQUEUED is still on its way to the next instance.
    """
    for job_id in {str(j) for j in job_ids if j}:
        rows = jobs.get(job_id)
        if not rows:
            return False
        if any(r.state in ACTIVE_STATES and (r.state != "REQUEUED" or r is rows[-1]) for r in rows):
            return False
    return True


def wait_for_final(job_ids: list[str], timeout_s: float, poll_s: float = 5.0,
                   query: Callable[[list[str]], dict[str, list[SacctRow]]] = query_jobs,
                   sleep: Callable[[float], None] = time.sleep) -> dict[str, list[SacctRow]]:
    """Poll sacct until the jobs' records are final (is_final) or `timeout_s` passes; the last rows.

    slurmctld hands records to slurmdbd asynchronously, so a job that just ended may still show
    RUNNING, or not at all, for a few seconds.
    """
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        jobs = query(job_ids)
        if is_final(jobs, job_ids) or time.monotonic() >= deadline:
            return jobs
        sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
