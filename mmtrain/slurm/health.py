"""Whether the allocation a job runs in lost a node: asked when a stage's processes fail inside a job.

When a node dies, the ranks on the others fail at once (their peers' connections close, or the
collective times out) while `srun` waits until the controller declares the node down
(`SlurmdTimeout`); by then `sinfo` shows it `down*` (`*`: not responding). A failure with every node
of the allocation healthy is the stage's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess

UNHEALTHY = ("down", "fail", "unknown", "future", "power_down", "powered_down")
"""Node states (sinfo %T, lower case, without a trailing `*`) of a node that died or was taken away; a
draining node still runs its jobs, so a failure there is the job's own."""


def lost_nodes(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The nodes of this job's allocation that are down or not responding, with sinfo's state; {} outside
    a job or when SLURM cannot be asked."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST")
    if not nodelist or shutil.which("sinfo") is None:
        return {}
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-n", nodelist, "-o", "%N|%T"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lost = {}
    for line in result.stdout.splitlines():
        name, _, state = line.strip().partition("|")
        if name and is_lost(state):
            lost[name] = state
    return lost


def is_lost(state: str) -> bool:
    """sinfo's %T state of a node that cannot go on running a job: not responding (`*`), down, failing."""
    return state.endswith("*") or state.rstrip("*~#!%$@^-").lower().startswith(UNHEALTHY)


def allocation_lost_node() -> str | None:
    """A pipeline `lost_node` check: which nodes of this job were lost, in words, or None."""
    lost = lost_nodes()
    if not lost:
        return None
    names = ", ".join(f"{name} ({state})" for name, state in sorted(lost.items()))
    return f"job {os.environ.get('SLURM_JOB_ID', '?')}: node(s) {names} down or not responding"
