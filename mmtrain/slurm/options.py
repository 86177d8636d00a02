"""SLURM job options of a stage: the recipe's `slurm:` block, the stage's overrides, the command line.

Nothing site-specific lives in mmtrain: partition, account, QOS, time limit and GPU type come from
the recipe or from `mmtrain submit` flags (which win), and anything else sbatch accepts can be
passed through `extra`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from mmtrain.config.loader import ConfigError, from_dict

_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass
class SlurmOptions:
    """One stage's job. YAML: `slurm: {partition: gpu, time: "04:00:00", nodes: 2, gpus_per_node: 8}`."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    """Time limit, sbatch syntax (`MM`, `HH:MM:SS`, `D-HH:MM:SS`); the partition's default when unset."""
    nodes: int = 1
    gpus_per_node: int | None = None
    """GPUs (= ranks, one task per GPU) per node; default: the stage's `launch.nprocs`. 0 = no GPUs
    requested (CPU nodes): `launch.nprocs` tasks per node."""
    gpu_type: str | None = None
    """GRES type (`--gres=gpu:TYPE:N`) and the GPU the cost report prices (h100, a100, ...)."""
    gres_type: str | None = None
    """The site's GRES name when it differs from `gpu_type` (e.g. `a100_80g`); empty string = untyped."""
    cpus_per_task: int | None = None
    mem: str | None = None
    """Memory per node, sbatch syntax (`64G`); `0` = all of it."""
    constraint: str | None = None
    signal_seconds: int = 120
    """SIGUSR1 this many seconds before the time limit: checkpoint, requeue, resume."""
    requeue: bool = True
    throttle: int | None = None
    """Job arrays (`--array-over`): at most this many tasks at once (`--array=0-N%throttle`)."""
    extra: list[str] = field(default_factory=list)
    """More sbatch options, verbatim (`--exclusive`, `--mail-type=END`)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before mmtrain (`module load cuda/12.4`, `source ~/venvs/mm/bin/activate`)."""
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None
    """Interpreter on the compute nodes; default: the one running `mmtrain submit`."""

    @property
    def python_executable(self) -> str:
        return self.python or sys.executable

    def gpus(self, nprocs: int) -> int:
        return nprocs if self.gpus_per_node is None else self.gpus_per_node

    def tasks_per_node(self, nprocs: int) -> int:
        return self.gpus(nprocs) or nprocs

    def gres(self, nprocs: int) -> str | None:
        count = self.gpus(nprocs)
        if count == 0:
            return None
        kind = self.gres_type if self.gres_type is not None else self.gpu_type
        return f"gpu:{kind}:{count}" if kind else f"gpu:{count}"


CLI_KEYS = ("partition", "account", "qos", "time", "nodes", "gpus_per_node", "gpu_type", "cpus_per_task", "mem",
            "throttle")


def resolve_options(raw: dict[str, Any], source: str, command_line: dict[str, Any] | None = None) -> SlurmOptions:
    """Validate a stage's `slurm` mapping (unknown keys fail naming the key) and apply the command line's."""
    merged = {**raw, **{k: v for k, v in (command_line or {}).items() if v is not None}}
    options = from_dict(SlurmOptions, merged, source=source, prefix="slurm.")
    if options.nodes < 1:
        raise ConfigError(f"{source}: slurm.nodes: must be at least 1, got {options.nodes}")
    if options.gpus_per_node is not None and options.gpus_per_node < 0:
        raise ConfigError(f"{source}: slurm.gpus_per_node: must be 0 or more, got {options.gpus_per_node}")
    if options.time is not None and not _TIME.match(str(options.time)):
        raise ConfigError(f"{source}: slurm.time: {options.time!r} is not a SLURM time limit; use MM, HH:MM:SS "
                          "or D-HH:MM:SS (quote it in YAML: time: \"04:00:00\")")
    if options.signal_seconds < 0:
        raise ConfigError(f"{source}: slurm.signal_seconds: must be 0 or more (0 = no warning signal)")
    if options.throttle is not None and options.throttle < 1:
        raise ConfigError(f"{source}: slurm.throttle: must be at least 1, got {options.throttle}")
    for flag in options.extra:
        if not str(flag).startswith("--"):
            raise ConfigError(f"{source}: slurm.extra: {flag!r} is not an sbatch long option; write it as "
                              "--name=value")
    return options


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SlurmOptions)]
