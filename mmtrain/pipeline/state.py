"""What a pipeline's run folder says about each stage: its state, its record, its cost, the summary.

A stage folder `<output_dir>/<NN>-<name>/` holds the trainer's run folder plus:
- `stage_config.yaml`: the fully resolved run config the stage trains with;
- `stage.json`: the stage's record, written (atomically) when it ends: `done` only after training
  and every evaluation; `failed` or `stopped` otherwise. No `stage.json` = never finished;
- `attempts.jsonl`: one `start` and one `end` line per training or evaluation subprocess, for the
  cost accounting (wall time x processes); an attempt killed together with the pipeline gets its
  `end` line estimated from the folder's last write when the stage next runs;
- `logs/train.log`, `logs/eval-<name>.log`: the subprocesses' output, appended per attempt;
- `eval/<name>.json`: each evaluation's results.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from mmtrain.config.loader import ConfigError, from_dict
from mmtrain.config.paths import latest_checkpoint
from mmtrain.config.schema import RunConfig
from mmtrain.errors import UserError
from mmtrain.pipeline.recipe import Pipeline, Stage, config_differences, hashable_config
from mmtrain.utils.io import append_line, atomic_write_json
from mmtrain.config.paths import RunDir

STAGE_FILE = "stage.json"
ATTEMPTS_FILE = "attempts.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"

_held_locks: set[Path] = set()


class StageBusyError(UserError, RuntimeError):
    """Another process is running this stage."""


@dataclass
class StageState:
    """A stage's state on disk, compared with the recipe as resolved now."""

    status: str
    """`done`, `failed`, `stopped` (ended at stop_after_steps), `running` (another process holds it),
    `interrupted` (started, never ended: killed), or `not started`."""
    record: dict[str, Any] | None = None
    """The stage's stage.json, if any."""
    step: int | None = None
    """Step of the latest complete checkpoint, if any."""
    changes: list[str] = field(default_factory=list)
    """How the stage's config differs from the one it ran with (`key: old -> new`); empty = same."""

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def stale(self) -> bool:
        """It ran with another config and holds results that would be mixed with the new one's."""
        return bool(self.changes) and (self.done or self.step is not None)

    def describe(self, stage: Stage) -> str:
        """One line for plans and messages, e.g. `interrupted at step 40/300`."""
        steps = f"step {self.step or 0}/{stage.config.max_steps}"
        if self.done:
            text = f"done ({steps})"
        elif self.status == "not started":
            text = "not started"
        else:
            text = f"{self.status} at {steps}"
        if self.stale:
            text += "; its config changed since: " + "; ".join(self.changes)
        return text


def probe(stage: Stage) -> StageState:
    """The state of `stage` from its folder (no side effects)."""
    folder = stage.folder
    record = read_json(folder / STAGE_FILE)
    step = latest_step(folder)
    if _is_locked(folder):
        status = "running"
    elif record is not None and record.get("status") in ("done", "failed", "stopped"):
        status = record["status"]
    elif folder.is_dir() and any(folder.iterdir()):
        status = "interrupted"
    else:
        status = "not started"
    changes: list[str] = []
    if stage.config_file.is_file() and status != "not started":
        # Compared key by key rather than by the recorded hash: a stored config that only lacks keys
        # added to the schema since (read back with their defaults) still describes the same stage.
        changes = _config_changes(stage)
    elif record is not None and record.get("status") == "done" and record.get("config_hash") != stage.config_hash:
        changes = [f"(the stored {stage.config_file.name} is gone; the config hash differs)"]
    return StageState(status=status, record=record, step=step, changes=changes)


def missing_evals(stage: Stage) -> list[str]:
    """The stage's evals without a result file (e.g. added to the recipe after the stage finished):
    a `done` stage with any is run again, which runs only them."""
    return [spec.name for spec in stage.evals if not stage.eval_output(spec).is_file()]


def _config_changes(stage: Stage) -> list[str]:
    try:
        raw = yaml.safe_load(stage.config_file.read_text()) or {}
        stored = from_dict(RunConfig, raw, source=str(stage.config_file))
    except (OSError, yaml.YAMLError, ConfigError, TypeError) as exc:
        return [f"(cannot read the stored {stage.config_file.name}: {exc})"]
    root = stage.folder.parent
    return config_differences(hashable_config(stored, root), hashable_config(stage.config, root))


def latest_step(folder: Path) -> int | None:
    """The step of the latest complete checkpoint in a run folder, or None."""
    latest = latest_checkpoint(folder)
    return int(latest.name.split("_")[-1]) if latest is not None else None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it does not exist or is not a complete JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------- locking
@contextlib.contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """Hold the stage folder's lock (released by the OS if the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise StageBusyError(f"{folder} is being run by another process (pid {owner})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        _held_locks.add(folder.resolve())
        yield
    finally:
        _held_locks.discard(folder.resolve())
        handle.close()


def _is_locked(folder: Path) -> bool:
    path = folder / LOCK_FILE
    if not path.is_file():
        return False
    if folder.resolve() in _held_locks:
        return True
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


# ---------------------------------------------------------------------------------------------- attempts
def begin_attempt(folder: Path, kind: str) -> dict[str, Any]:
    """Record that a subprocess of `kind` (`train`, `eval:NAME`) starts now; returns the attempt."""
    attempt = {"event": "start", "id": uuid.uuid4().hex[:12], "kind": kind, "time": time.time()}
    append_line(folder / ATTEMPTS_FILE, json.dumps(attempt))
    return attempt


def end_attempt(folder: Path, attempt: dict[str, Any], returncode: int | None, wall_s: float,
                estimated: bool = False) -> None:
    """Record the end of an attempt (`returncode` None = interrupted)."""
    record = {"event": "end", "id": attempt["id"], "kind": attempt["kind"], "time": time.time(),
              "wall_s": round(wall_s, 3), "returncode": returncode}
    if estimated:
        record["estimated"] = True
    append_line(folder / ATTEMPTS_FILE, json.dumps(record))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, skipping a line cut by a kill mid-write; [] when absent."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def read_attempts(folder: Path) -> list[dict[str, Any]]:
    return _read_jsonl(folder / ATTEMPTS_FILE)


def close_dangling_attempts(folder: Path) -> None:
    """Give attempts that never ended (killed with the pipeline) an estimated end: the folder's last write."""
    records = read_attempts(folder)
    ended = {r["id"] for r in records if r.get("event") == "end"}
    dangling = [r for r in records if r.get("event") == "start" and r["id"] not in ended]
    if not dangling:
        return
    last_write = max((p.stat().st_mtime for p in folder.rglob("*")
                      if p.is_file() and p.name not in (ATTEMPTS_FILE, LOCK_FILE)), default=0.0)
    for attempt in dangling:
        end_attempt(folder, attempt, None, max(0.0, last_write - attempt["time"]), estimated=True)


def attempt_totals(folder: Path) -> dict[str, Any]:
    """Wall seconds spent training and evaluating (all attempts, interrupted ones included)."""
    train = evaluate = 0.0
    count = 0
    for record in read_attempts(folder):
        if record.get("event") != "end":
            continue
        if record["kind"] == "train":
            train += record["wall_s"]
            count += 1
        else:
            evaluate += record["wall_s"]
    return {"train_wall_s": round(train, 3), "eval_wall_s": round(evaluate, 3), "train_attempts": count}


# ---------------------------------------------------------------------------------------------- records
def stage_record(stage: Stage, status: str, message: str | None = None) -> dict[str, Any]:
    """The stage.json content for `stage` from what its folder holds now."""
    folder = stage.folder
    metrics = _read_metrics(folder)
    train = [r for r in metrics if "loss" in r]
    val = [r for r in metrics if "val_loss" in r]
    run_info = read_json(RunDir(folder).run_info) or {}
    step = latest_step(folder)
    evals = {spec.name: read_json(stage.eval_output(spec)) for spec in stage.evals
             if stage.eval_output(spec).is_file()}
    record: dict[str, Any] = {
        "name": stage.name,
        "index": stage.index,
        "status": status,
        "folder": str(folder),
        "config_hash": stage.config_hash,
        "final_checkpoint": str(stage.final_checkpoint) if status == "done" else None,
        "steps": step,
        "max_steps": stage.config.max_steps,
        "train_loss": train[-1]["loss"] if train else None,
        "val_loss": val[-1]["val_loss"] if val else None,
        "inherits": stage.requires,
        "timing": {
            **attempt_totals(folder),
            "nprocs": run_info.get("world_size", stage.launch.nprocs),
            "launcher": stage.launch.launcher if stage.launch.nprocs > 1 else "single-process",
            "device": run_info.get("accelerator", "unknown"),
        },
        "evals": evals,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if message:
        record["message"] = message
    return record


def _read_metrics(folder: Path) -> list[dict[str, Any]]:
    return _read_jsonl(RunDir(folder).metrics)


def headline(result: Any) -> dict[str, float]:
    """An eval's headline numbers: its `headline` dict if it has one, else its numeric top-level values."""
    if not isinstance(result, dict):
        return {}
    source = result["headline"] if isinstance(result.get("headline"), dict) else result
    return {k: v for k, v in source.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def process_hours(timing: dict[str, Any]) -> float:
    """(training + evaluation wall time) x processes, in hours: GPU-hours when each process drives one GPU."""
    wall = timing.get("train_wall_s", 0.0) + timing.get("eval_wall_s", 0.0)
    return round(wall * int(timing.get("nprocs") or 1) / 3600.0, 6)


# ---------------------------------------------------------------------------------------------- summary
def summary(pipeline: Pipeline) -> dict[str, Any]:
    """The run's summary from every stage's state on disk."""
    rows = []
    for stage in pipeline.stages:
        state = probe(stage)
        record = state.record if state.record is not None and state.status != "running" else {}
        timing = record.get("timing") or {**attempt_totals(stage.folder), "nprocs": stage.launch.nprocs}
        rows.append({
            "name": stage.name,
            "folder": str(stage.folder),
            "status": state.status,
            "steps": record.get("steps", state.step),
            "max_steps": stage.config.max_steps,
            "train_loss": record.get("train_loss"),
            "val_loss": record.get("val_loss"),
            "timing": timing,
            "process_hours": process_hours(timing),
            "headline": {name: headline(result) for name, result in (record.get("evals") or {}).items()},
            **({"message": record["message"]} if record.get("message") else {}),
        })
    return {
        "recipe": pipeline.name,
        "recipe_file": str(pipeline.recipe_path),
        "output_dir": str(pipeline.output_dir),
        "overrides": pipeline.overrides,
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stages": rows,
        "total_process_hours": round(sum(r["process_hours"] for r in rows), 6),
    }


def write_summary(pipeline: Pipeline) -> dict[str, Any]:
    """Rewrite `<output_dir>/summary.json` (atomically); returns its content."""
    data = summary(pipeline)
    atomic_write_json(pipeline.output_dir / SUMMARY_FILE, data)
    return data


def format_table(data: dict[str, Any]) -> str:
    """The summary as a short table: stage, status, steps, train loss, wall time, eval headline numbers."""
    header = ("stage", "status", "steps", "train loss", "wall", "evals")
    lines = [header]
    for row in data["stages"]:
        timing = row["timing"]
        wall = timing.get("train_wall_s", 0.0) + timing.get("eval_wall_s", 0.0)
        evals = "  ".join(f"{name}: " + " ".join(f"{k}={_number(v)}" for k, v in numbers.items())
                          for name, numbers in row["headline"].items())
        lines.append((
            row["name"], row["status"], f"{row['steps'] or 0}/{row['max_steps']}",
            f"{row['train_loss']:.4f}" if isinstance(row["train_loss"], (int, float)) else "-",
            _duration(wall) if wall else "-", evals or "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1]
                     for line in lines)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
