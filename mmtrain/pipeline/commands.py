"""The subprocess commands a stage runs: training, then each evaluation, under the stage's launcher.

Every command is a plain argument list, so it can be shown (`--plan`), logged, run here, or later
written into a batch script. One process runs as `python -m MODULE ...`; several run under the
DeepSpeed launcher (`deepspeed --num_gpus N --master_port P --module MODULE ...`) or torchrun, or as a
step of the SLURM allocation the pipeline runs in (`srun --ntasks N python -m MODULE ...`).
Launchers are started through the running interpreter (`python -m deepspeed.launcher.runner`,
`python -m torch.distributed.run`) so that they use the same environment as the pipeline.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from mmtrain.pipeline.recipe import EvalSpec, LaunchConfig, Stage


def free_port() -> int:
    """A TCP port free on this machine right now (for the launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_prefix(launch: LaunchConfig, port: int | str | None = None, python: str | None = None) -> list[str]:
    """The start of a command running a Python module with `launch.nprocs` processes.

    The module name and its arguments follow; `port` defaults to a free one (a string such as
    `PORT` stands for it in printed plans). DeepSpeed gets `--no_local_rank` because
    `python -m mmtrain eval` takes a command word first; ranks come from the environment.
    """
    python = python or sys.executable
    if launch.launcher == "srun":  # a step of the allocation this runs in; ranks from SLURM variables
        port = port if port is not None else free_port()
        return ["srun", f"--ntasks={launch.nprocs}", "--kill-on-bad-exit=1", f"--export=ALL,MASTER_PORT={port}",
                python, "-m"]
    if launch.nprocs == 1:
        return [python, "-m"]
    port = port if port is not None else free_port()
    if launch.launcher == "deepspeed":
        return [python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(launch.nprocs),
                "--master_port", str(port), "--no_local_rank", "--module"]
    if launch.launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.nprocs),
                "--master_port", str(port), "-m"]
    raise ValueError(f"unknown launcher {launch.launcher!r}")


def train_command(stage: Stage, port: int | str | None = None, python: str | None = None) -> list[str]:
    """`python -m mmtrain.train STAGE_DIR/stage_config.yaml`, under the stage's launcher."""
    return [*launcher_prefix(stage.launch, port, python), "mmtrain.train", str(stage.config_file)]


def eval_command(stage: Stage, spec: EvalSpec, port: int | str | None = None, python: str | None = None,
                 data: str | None = None) -> list[str]:
    """`python -m mmtrain eval STAGE_DIR --data DATA --out STAGE_DIR/eval/NAME.json [flags]`.

    Args:
        data: the manifest path to pass (default: the recipe's value, e.g. an `asset:` reference
            already resolved by the caller).
    """
    return [*launcher_prefix(stage.launch, port, python), "mmtrain", "eval", str(stage.folder),
            "--data", data if data is not None else spec.data, "--out", str(stage.eval_output(spec)),
            *option_flags(spec.options)]


def option_flags(options: dict[str, Any]) -> list[str]:
    """Command-line flags for an eval entry's extra keys.

    `max_new_tokens: 16` -> `--max-new-tokens 16`; `true` -> the bare flag; `false`/`null` -> nothing;
    a list -> one comma-joined value; a mapping -> `KEY=VALUE` arguments after the flag
    (`set: {data.max_length: 256}` -> `--set data.max_length=256`).
    """
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            flags += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, dict):
            if value:
                flags += [flag, *(f"{k}={_scalar(v)}" for k, v in value.items())]
        else:
            flags += [flag, str(value)]
    return flags


def _scalar(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    return "null" if value is None else str(value)


def rendezvous_port(command: list[str]) -> str | None:
    """The rendezvous port a launcher command uses (to clean up after it), or None."""
    if "--master_port" in command:
        return command[command.index("--master_port") + 1]
    for arg in command:
        if arg.startswith("--export=ALL,MASTER_PORT="):
            return arg.rsplit("=", 1)[1]
    return None
