"""`mmtrain submit`: render every stage's sbatch script into the run folder and submit them in order.

Each stage is one job (or one job array with `--array-over`); a stage waits for the stages it
inherits weights from: `--dependency=afterok:JOB` (array to array: `aftercorr`, task i after task
i). Stages already done in the run folder are not submitted. The submission is recorded in
`<run>/slurm/jobs.json` after every sbatch call, so a partial submission is never lost; if one
sbatch call fails, the jobs this call already submitted are cancelled and the error says why.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from mmtrain.errors import UserError
from mmtrain.pipeline.recipe import Pipeline, Stage
from mmtrain.pipeline.state import missing_evals, probe, read_json
from mmtrain.slurm.options import SlurmOptions, resolve_options
from mmtrain.slurm.render import Variant, render_stage, variants
from mmtrain.utils.io import atomic_write_json, atomic_write_text

JOBS_FILE = "jobs.json"


class SubmitError(UserError, RuntimeError):
    """sbatch refused a job (the message has sbatch's own words) or SLURM is not reachable."""


@dataclass
class PlannedJob:
    stage: Stage
    options: SlurmOptions
    script: Path
    text: str
    depends_on: list[str] = field(default_factory=list)
    """Stages this job waits for (those it inherits weights from and that are not done)."""
    array: str | None = None
    """sbatch --array value, e.g. `0-2%2`."""


def jobs_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "slurm" / JOBS_FILE


def plan(pipeline: Pipeline, command_line: dict[str, Any], overrides: list[str],
         array_over: list[tuple[str, list[str]]], only: list[str] | None = None) -> tuple[list[PlannedJob], list[Variant]]:
    """Resolve every stage's options and render its script (nothing written, nothing submitted)."""
    tasks = variants(array_over, pipeline.output_dir)
    jobs: list[PlannedJob] = []
    planned: set[str] = set()
    for stage in pipeline.stages:
        if only is not None and stage.name not in only:
            continue
        if not tasks and probe(stage).done and not missing_evals(stage):
            continue
        options = resolve_options(stage.slurm, f"{pipeline.recipe_path}: stages.{stage.name}", command_line)
        throttle = options.throttle
        text = render_stage(pipeline, stage, options, pipeline.output_dir, overrides, tasks, throttle)
        script = pipeline.output_dir / "slurm" / f"{stage.index:02d}-{stage.name}.sbatch"
        array = None
        if tasks:
            array = f"0-{len(tasks) - 1}" + (f"%{throttle}" if throttle else "")
        depends = [name for name in stage.requires if name in planned]
        jobs.append(PlannedJob(stage=stage, options=options, script=script, text=text, depends_on=depends,
                               array=array))
        planned.add(stage.name)
    return jobs, tasks


def sbatch_command(job: PlannedJob, job_ids: dict[str, str]) -> list[str]:
    command = ["sbatch", "--parsable"]
    if job.array:
        command.append(f"--array={job.array}")
    if job.depends_on:
        kind = "aftercorr" if job.array else "afterok"
        command.append("--dependency=" + ",".join(f"{kind}:{job_ids[name]}" for name in job.depends_on))
        command.append("--kill-on-invalid-dep=yes")
    return command + [str(job.script)]


def submit(pipeline: Pipeline, jobs: list[PlannedJob], tasks: list[Variant], overrides: list[str],
           dry_run: bool, out: TextIO) -> dict[str, Any]:
    """Write the scripts; unless `dry_run`, sbatch them in order. Returns the jobs.json content."""
    record: dict[str, Any] = {
        "recipe": str(pipeline.recipe_path.resolve()), "recipe_name": pipeline.name,
        "output_dir": str(pipeline.output_dir.resolve()),
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "overrides": overrides,
        "variants": [{"index": v.index, "label": v.label, "output_dir": str(v.output_dir.resolve())} for v in tasks],
        "dry_run": dry_run, "stages": [],
    }
    for job in jobs:
        atomic_write_text(job.script, job.text)
        job.script.chmod(0o755)
    (pipeline.output_dir / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    job_ids: dict[str, str] = {}
    submitted: list[str] = []
    for job in jobs:
        command = sbatch_command(job, {name: job_ids.get(name, f"<{name}>") for name in job.depends_on})
        entry = {"name": job.stage.name, "index": job.stage.index, "script": str(job.script.resolve()),
                 "array": job.array, "depends_on": job.depends_on, "sbatch": command,
                 "log": str((pipeline.output_dir / "slurm" / "logs").resolve()), "job_id": None,
                 "stage_folders": ([str((v.output_dir / job.stage.folder.name).resolve()) for v in tasks]
                                   or [str(job.stage.folder.resolve())])}
        record["stages"].append(entry)
        if dry_run:
            print(f"[dry run] {shlex.join(command)}", file=out)
            continue
        try:
            job_id = _sbatch(command)
        except SubmitError as exc:
            if submitted:
                subprocess.run(["scancel", *submitted], capture_output=True)
            atomic_write_json(jobs_path(pipeline.output_dir), {**record, "error": str(exc), "cancelled": submitted})
            cancelled = f"; cancelled the jobs submitted before it ({', '.join(submitted)})" if submitted else ""
            raise SubmitError(f"stage {job.stage.name}: {exc}{cancelled}") from None
        job_ids[job.stage.name] = job_id
        submitted.append(job_id)
        entry["job_id"] = job_id
        entry["sbatch"] = command
        atomic_write_json(jobs_path(pipeline.output_dir), record)
        waits = f" after {', '.join(f'{n} ({job_ids[n]})' for n in job.depends_on)}" if job.depends_on else ""
        array = f" array {job.array}" if job.array else ""
        print(f"submitted stage {job.stage.name}: job {job_id}{array}{waits}", file=out, flush=True)
    if dry_run:
        atomic_write_json(pipeline.output_dir / "slurm" / "dry-run.json", record)
    return record


def _sbatch(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run this on a SLURM login node (or use `mmtrain run` to run here)") \
            from None
    except subprocess.TimeoutExpired:
        raise SubmitError("sbatch did not answer in 120 s; is slurmctld reachable (`sinfo`)?") from None
    if result.returncode != 0:
        raise SubmitError(f"sbatch refused it: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def read_jobs(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's jobs.json, or None when it was never submitted."""
    return read_json(jobs_path(run_dir))


def dependents(record: dict[str, Any], stage_name: str) -> list[dict[str, Any]]:
    """Stage entries that wait, directly or through others, for `stage_name`."""
    found: list[dict[str, Any]] = []
    names = {stage_name}
    for entry in record.get("stages", []):
        if set(entry.get("depends_on", [])) & names:
            found.append(entry)
            names.add(entry["name"])
    return found


def cancel_dependents(run_dir: str | Path, stage_name: str, array_task: str | None) -> list[str]:
    """scancel the jobs waiting for a failed stage (one array task's chain when `array_task` is set).

    SLURM cancels them too when `kill_invalid_depend` is configured; many sites do not set it, and
    a job waiting for a failed dependency then pends forever.
    """
    record = read_jobs(run_dir)
    if not record:
        return []
    targets = []
    for entry in dependents(record, stage_name):
        if entry.get("job_id"):
            targets.append(f"{entry['job_id']}_{array_task}" if entry.get("array") and array_task else entry["job_id"])
    if targets:
        subprocess.run(["scancel", *targets], capture_output=True, timeout=60)
    return targets


def cancel_waiting_jobs(stage: Stage, out: TextIO) -> None:
    """A pipeline `on_failure` hook: inside a submitted job, scancel the jobs waiting for the failed `stage`."""
    submit_dir = os.environ.get("MMTRAIN_SUBMIT_DIR")
    if not submit_dir or not os.environ.get("SLURM_JOB_ID"):
        return
    cancelled = cancel_dependents(submit_dir, stage.name, os.environ.get("SLURM_ARRAY_TASK_ID"))
    if cancelled:
        print(f"stage {stage.name} failed: cancelled the jobs waiting for it: {', '.join(cancelled)}",
              file=sys.stderr, flush=True)
