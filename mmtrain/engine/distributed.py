"""Process-group set-up for every way mmtrain is launched.

- `deepspeed --num_gpus N --module mmtrain.train ...` and `torchrun --nproc_per_node N -m mmtrain.train ...`
  set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT themselves.
- `srun` sets SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS: ranks come from those, MASTER_ADDR
  is the first host of the step (`scontrol show hostnames`), MASTER_PORT derives from the job id.
- A bare `python -m mmtrain.train ...` runs as a single rank on a free local port.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mmtrain.config.schema import DEFAULT_COLLECTIVE_TIMEOUT_S
from mmtrain.engine.preemption import EXIT_REQUEUE
from mmtrain.errors import UserError

RETIRED_TIMEOUT_VARIABLE = "MMTRAIN_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def setup_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Fill the torch.distributed environment variables for the launcher in use (in place)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
        env.setdefault("LOCAL_RANK", env["RANK"])
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        launcher = "srun"
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        env.setdefault("MASTER_ADDR", _first_slurm_host(nodelist))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        launcher = "single-process"
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), launcher)


def init_distributed(timeout_s: int = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistEnv:
    """Set up the environment and DeepSpeed's process group (gloo on CPU, NCCL on CUDA), whose collectives
    fail after `timeout_s` seconds without the other ranks (the run config's `collective_timeout_s`)."""
    # heavy; imported where used, once the accelerator is chosen
    import deepspeed

    if RETIRED_TIMEOUT_VARIABLE in os.environ:
        raise UserError(f"{RETIRED_TIMEOUT_VARIABLE} is no longer read: set `collective_timeout_s: "
                        f"{os.environ[RETIRED_TIMEOUT_VARIABLE]}` in the run config (or --set "
                        f"collective_timeout_s=...) and unset the variable")
    dist_env = setup_dist_env()
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    return dist_env


RERUN_RESUMES = "A checkpointed run resumes from its last complete checkpoint when rerun (checkpoint.resume: auto)."


def explain_collective_failure(error: BaseException, timeout_s: int) -> None:
    """Add to a collective that failed because of another rank what happened and what to do (a note under
    its traceback): a peer that stopped responding for `timeout_s` seconds, or one whose process ended.
    gloo's errors only; NCCL's watchdog ends the process itself."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "gloo" not in text:
        return
    rank = os.environ.get("RANK", "0")
    if "Timed out waiting" in text:
        error.add_note(f"rank {rank}: a collective waited collective_timeout_s = {timeout_s} s for the other "
                       "ranks: one of them stopped responding (its process or node stalled or was cut off, or it "
                       "took another code path). Check the other ranks' logs. If a step, evaluation or "
                       "checkpoint save can legitimately take that long, raise collective_timeout_s in the run "
                       f"config. {RERUN_RESUMES}")
    elif "Connection closed by peer" in text or "Connection reset by peer" in text:
        error.add_note(f"rank {rank}: another rank's process ended, or its node was lost, in the middle of a "
                       f"collective; its own log says why. {RERUN_RESUMES}")


def leave_distributed(exit_code: int) -> int:
    """End the process group on every rank together when a command ends cleanly; returns `exit_code`.

    Ranks that exit with the group still alive can be aborted at interpreter exit: gloo's worker threads
    still hold work whose tensors are freed after the interpreter is gone ("terminate called without an
    active exception", SIGABRT), and the launcher then reports a run that had finished as failed. So
    every rank meets the others at a barrier and destroys the group while Python is alive. Only after a
    clean end (0, or the requeue exit that every rank takes together): after an error the other ranks
    may never reach the barrier.
    """
    torch_dist = sys.modules.get("torch.distributed")
    if exit_code in (0, EXIT_REQUEUE) and torch_dist is not None and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return exit_code


SHM_DIR = Path("/dev/shm")


def remove_shm_allreduce_buffers(port: int | str) -> int:
    """Delete the shared-memory all-reduce buffers DeepSpeed left behind for the job that used `port`.

    On CPU, DeepSpeed's shared-memory all-reduce creates `/dev/shm/deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>`
    (~66 MB a rank) and never removes them; /dev/shm is memory, so every multi-process CPU job would
    leak it. Call this once the job's processes have exited. Returns how many files were removed.
    """
    removed = 0
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
