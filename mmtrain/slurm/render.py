"""Render one sbatch script per stage from `templates/stage.sbatch`.

The script's header documents the run (stage, trainable parts, nodes x GPUs, batch, LR) so that a
script found later in a run folder says what it trained. Its body runs
`python -m mmtrain run RECIPE --stage NAME --srun`: the pipeline runner inside the allocation,
which trains (resuming from the stage's latest checkpoint), evaluates and writes the stage record
exactly as a local `mmtrain run` does, with every process an `srun` step of the job.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mmtrain
from mmtrain.config.loader import ConfigError
from mmtrain.models.counting import count_parameters
from mmtrain.pipeline.recipe import Pipeline, Stage, trained_components
from mmtrain.slurm.options import SlurmOptions
from mmtrain.config.paths import LEDGER_FILE

TEMPLATE = Path(__file__).parent / "templates" / "stage.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Variant:
    """One task of a job array: its overrides and its own run folder."""

    index: int
    assignments: list[str]
    output_dir: Path

    @property
    def label(self) -> str:
        return ",".join(self.assignments)


def parse_array_over(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2,...` flags -> [(KEY, [V1, V2, ...])]; ConfigError (a ValueError) naming the bad flag."""
    parsed = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",")] if sep else []
        if not key.strip() or not items or any(v == "" for v in items):
            raise ConfigError(f"--array-over {spec!r}: expected KEY=V1,V2,... (e.g. --array-over seed=1,2,3)")
        parsed.append((key.strip(), items))
    return parsed


def variants(array_over: list[tuple[str, list[str]]], output_dir: Path) -> list[Variant]:
    """Every combination of the array's values (the cartesian product, first key slowest)."""
    if not array_over:
        return []
    keys = [k for k, _ in array_over]
    out = []
    for index, values in enumerate(itertools.product(*(v for _, v in array_over))):
        assignments = [f"{k}={v}" for k, v in zip(keys, values)]
        slug = _SLUG.sub("-", "_".join(f"{k.split('.')[-1]}-{Path(v).name or v}" for k, v in zip(keys, values)))
        out.append(Variant(index=index, assignments=assignments,
                           output_dir=output_dir / "variants" / f"{index}-{slug[:60].strip('-')}"))
    return out


def describe_trainable(stage: Stage) -> str:
    """`projector, resampler: 1,234,567 of 138,000,000 parameters` (counted on the meta device)."""
    parts = sorted(trained_components(stage.config)) or ["nothing"]
    try:
        total = next(r for r in count_parameters(stage.config.model)["components"] if r["component"] == "total")
        return f"{', '.join(parts)}: {int(total['trainable']):,} of {int(total['total']):,} parameters"
    except Exception:  # counting needs the model configs; the header then names the parts only
        return ", ".join(parts)


def render_stage(pipeline: Pipeline, stage: Stage, options: SlurmOptions, submit_dir: Path,
                 overrides: list[str], array: list[Variant], throttle: int | None) -> str:
    """The sbatch script of `stage` (dependencies are added on sbatch's command line)."""
    cfg = stage.config
    nprocs = stage.launch.nprocs
    tasks = options.tasks_per_node(nprocs)
    world = tasks * options.nodes
    log_name = f"{stage.index:02d}-{stage.name}-" + ("%A_%a" if array else "%j") + ".out"
    command = [options.python_executable, "-m", "mmtrain", "run", str(pipeline.recipe_path.resolve()),
               "--stage", stage.name, "--srun"]
    for assignment in overrides:
        command += ["--set", assignment]
    if not array:
        command += ["--output-dir", str(pipeline.output_dir.resolve())]
    values = {
        "index": stage.index, "count": len(pipeline.stages), "stage": stage.name, "recipe_name": pipeline.name,
        "recipe": pipeline.recipe_path.resolve(), "output_dir": pipeline.output_dir.resolve(),
        "trainable": describe_trainable(stage),
        "nodes": options.nodes, "tasks_per_node": tasks, "world": world, "gres": options.gres(nprocs) or "none",
        "micro_batch": cfg.micro_batch_size, "grad_accum": cfg.grad_accum_steps,
        "global_batch": cfg.micro_batch_size * cfg.grad_accum_steps * world, "steps": cfg.max_steps,
        "lr": cfg.optim.lr, "schedule": f"{cfg.optim.schedule}, warm-up {cfg.optim.warmup_steps} steps",
        "precision": cfg.precision, "deepspeed": cfg.deepspeed,
        "inherits": ", ".join(f"{', '.join(s.modules) or 'all'} from {s.stage}" for s in stage.inherit) or "nothing",
        "array": _describe_array(array, throttle),
        "signal_seconds": options.signal_seconds,
        "job_name": f"{pipeline.name}.{stage.name}",
        "log": (submit_dir / "slurm" / "logs" / log_name).resolve(),
        "sbatch_options": "\n".join(f"#SBATCH {flag}" for flag in sbatch_flags(options, nprocs)),
        "setup": "\n".join(options.setup),
        "workdir": shlex.quote(str(Path.cwd())),
        "pythonpath": shlex.quote(str(Path(mmtrain.__file__).resolve().parents[1])),
        "ledger": shlex.quote(str((submit_dir / LEDGER_FILE).resolve())),
        "submit_dir": shlex.quote(str(submit_dir.resolve())),
        "environment": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in _environment(options).items()),
        "select_variant": _select_variant(array),
        "command": shlex.join(command) + (' "${VARIANT_ARGS[@]}"' if array else ""),
    }
    return _fill(TEMPLATE.read_text(), values)


def sbatch_flags(options: SlurmOptions, nprocs: int) -> list[str]:
    """The `#SBATCH` options that depend on the recipe and command line."""
    flags = []
    for key in ("partition", "account", "qos", "time", "constraint"):
        value = getattr(options, key)
        if value:
            flags.append(f"--{key}={value}")
    gres = options.gres(nprocs)
    if gres:
        flags.append(f"--gres={gres}")
    if options.cpus_per_task:
        flags.append(f"--cpus-per-task={options.cpus_per_task}")
    if options.mem:
        flags.append(f"--mem={options.mem}")
    if options.signal_seconds:
        flags.append(f"--signal=USR1@{options.signal_seconds}")
    flags.append("--requeue" if options.requeue else "--no-requeue")
    return flags + list(options.extra)


def _environment(options: SlurmOptions) -> dict[str, Any]:
    env = dict(options.env)
    if options.gpu_type:
        env.setdefault("MMTRAIN_GPU_TYPE", options.gpu_type)
    return env


def _describe_array(array: list[Variant], throttle: int | None) -> str:
    if not array:
        return "no (one job)"
    limit = f", at most {throttle} at once" if throttle else ""
    return f"{len(array)} tasks{limit}: " + "; ".join(f"{v.index}: {v.label}" for v in array)


def _select_variant(array: list[Variant]) -> str:
    if not array:
        return ""
    lines = ['case "${SLURM_ARRAY_TASK_ID:?this script is a job array: submit it with --array}" in']
    for v in array:
        args = []
        for assignment in v.assignments:
            args += ["--set", assignment]
        args += ["--output-dir", str(v.output_dir.resolve())]
        lines.append(f"  {v.index}) VARIANT_ARGS=({shlex.join(args)}); export MMTRAIN_VARIANT={shlex.quote(v.label)} ;;")
    lines.append('  *) echo "no variant for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines)


def _fill(template: str, values: dict[str, Any]) -> str:
    def value(match: re.Match) -> str:
        return str(values[match.group(1)])

    text = _PLACEHOLDER.sub(value, template)
    return re.sub(r"\n{3,}", "\n\n", text)
