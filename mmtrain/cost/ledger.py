"""The run's cost ledger: an append-only JSONL file every process of every job writes to.

One ledger per run folder, `<run>/ledger.jsonl` (a pipeline's output folder, or a training run's
`output_dir` when `mmtrain train` runs alone). Appends are single `write(2)` calls on an
`O_APPEND` descriptor under an exclusive `flock`, so any number of ranks, array tasks and requeued
jobs can append at once without interleaving; an append that fails part-way (a full disk) is cut
back off, and a reader skips a line cut short by a kill.

Records (every one has `v`, `event`, `time` (Unix seconds), `run`, `stage`, `variant`, `attempt`
and the `job` block):
- `stage_start` / `stage_end`: one stage attempt (a pipeline runner invocation, i.e. one SLURM job
  run or one local `mmtrain run`), written by the runner; `stage_end` has `outcome`
  (`done`, `failed`, `preempted`, `stopped`, or `interrupted` when the runner itself was stopped),
  `wall_s`, `message`.
- `task`: one subprocess of the attempt (`kind` `train` or `eval:NAME`), its `wall_s`, `nprocs`,
  `returncode`.
- `process_start` / `process_end`: one training process (one rank); `process_end` has `outcome`
  (`completed`, `stopped`, `preempted`, `failed`), steps from/to, the attempt's global `samples`,
  `tokens`, `flops` (identical on every rank), the `timing` split (`startup_s`, `train_s`, `eval_s`,
  `checkpoint_s`, `wall_s`) and the rank's `memory`.
- `checkpoint`: rank 0 after a checkpoint is complete: `step`, cumulative `train_s`, `samples`,
  `tokens`, `flops` of the attempt so far (what a killed attempt has kept).
- `validation`: rank 0 after each validation: `step`, `epoch`, `metrics` (`val_loss`, ...) and the
  attempt's counters so far, as `checkpoint` (learning curves against FLOPs: `mmtrain.cost.curve`).
The `job` block: `job_id`, `array_job_id`, `array_task_id`, `restart_count` (SLURM requeues),
`nodes`, `gpus` (allocated to the whole attempt), `gpu_type`, `host`. docs/cost.md documents it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtrain.config.paths import LEDGER_FILE
from mmtrain.utils.io import append_line

__all__ = ["ENV_LEDGER", "LEDGER_FILE", "Ledger", "append_record", "new_attempt_id", "read_ledger", "slurm_job"]

SCHEMA_VERSION = 1
ENV_LEDGER = "MMTRAIN_LEDGER"
ENV_STAGE = "MMTRAIN_STAGE"
ENV_ATTEMPT = "MMTRAIN_ATTEMPT"
ENV_VARIANT = "MMTRAIN_VARIANT"
ENV_GPU_TYPE = "MMTRAIN_GPU_TYPE"
ENV_GPUS = "MMTRAIN_GPUS"


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the ledger (`append_line`: one write under an exclusive lock, cut back
    off if it fails part-way, then fsync).

    The lock (not only O_APPEND) keeps appends whole on file systems where O_APPEND is not atomic
    across hosts; the fsync makes an entry survive the node going down right after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_line(path, json.dumps(record, separators=(",", ":")), sync=True)


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """The ledger's records in order; lines cut short by a kill (not valid JSON objects) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            records.append(record)
    return records


def slurm_job(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The job block from SLURM's environment (all None outside a SLURM job)."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    gpus = _allocated_gpus(env)
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    return {
        "job_id": job_id,
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0) if job_id else 0,
        "nodes": int(nodes) if nodes and nodes.isdigit() else (1 if job_id else None),
        "gpus": gpus,
        "gpu_type": env.get(ENV_GPU_TYPE) or None,
        "host": socket.gethostname(),
    }


def _allocated_gpus(env: dict[str, str]) -> int | None:
    """GPUs allocated to the job: MMTRAIN_GPUS if set, else SLURM's GPU counts, else None."""
    if env.get(ENV_GPUS, "").isdigit():
        return int(env[ENV_GPUS])
    total = env.get("SLURM_GPUS")
    if total and total.split(":")[-1].isdigit():
        return int(total.split(":")[-1])
    per_node = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE")
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    if per_node and per_node.split(":")[-1].isdigit() and nodes.isdigit():
        return int(per_node.split(":")[-1]) * int(nodes)
    job_gpus = env.get("SLURM_JOB_GPUS")
    if job_gpus:
        return len([g for g in job_gpus.split(",") if g.strip()]) * (int(nodes) if nodes.isdigit() else 1)
    return None


@dataclass
class Ledger:
    """Where this process writes, and the fields every record of it carries."""

    path: Path
    run: str
    stage: str
    attempt: str
    variant: str | None = None
    job: dict[str, Any] = field(default_factory=slurm_job)

    @classmethod
    def from_env(cls, default_path: str | Path, default_stage: str) -> "Ledger":
        """The ledger named by the pipeline runner's environment, or `default_path` when run alone.

        A process started without a runner (plain `mmtrain train`) is its own attempt.
        """
        path = Path(os.environ.get(ENV_LEDGER) or default_path)
        return cls(path=path, run=path.parent.name, stage=os.environ.get(ENV_STAGE) or default_stage,
                   attempt=os.environ.get(ENV_ATTEMPT) or new_attempt_id(),
                   variant=os.environ.get(ENV_VARIANT) or None)

    def environment(self) -> dict[str, str]:
        """Variables that make a subprocess write to this ledger, as this stage and attempt."""
        env = {ENV_LEDGER: str(self.path), ENV_STAGE: self.stage, ENV_ATTEMPT: self.attempt}
        if self.variant:
            env[ENV_VARIANT] = self.variant
        return env

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"v": SCHEMA_VERSION, "event": event, "time": time.time(), "run": self.run, "stage": self.stage,
                  "variant": self.variant, "attempt": self.attempt, "job": self.job, **fields}
        append_record(self.path, record)
        return record


def new_attempt_id() -> str:
    return uuid.uuid4().hex[:12]
