"""Running a pipeline: stages in order in one run folder, each trained and evaluated in subprocesses.

A stage whose `stage.json` says `done` (with the same resolved config) is skipped; any other stage
is (re)run: training resumes from its latest checkpoint (`checkpoint.resume: auto`), evaluations
whose results file exists are not redone. `stage.json` is written only after training and every
evaluation, so a kill at any moment leaves a stage that the next run picks up where it stopped.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

from mmtrain.assets.common import AssetError
from mmtrain.assets.registry import ASSET_PREFIX, resolve_asset_reference
from mmtrain.config.loader import dump_config
from mmtrain.cost.ledger import ENV_LEDGER, ENV_VARIANT, LEDGER_FILE, Ledger, new_attempt_id, slurm_job
from mmtrain.engine.distributed import remove_shm_allreduce_buffers
from mmtrain.engine.preemption import EXIT_REQUEUE
from mmtrain.errors import UserError
from mmtrain.pipeline.commands import eval_command, rendezvous_port, train_command
from mmtrain.pipeline.recipe import Pipeline, Stage
from mmtrain.pipeline.state import (
    STAGE_FILE,
    StageBusyError,
    begin_attempt,
    close_dangling_attempts,
    end_attempt,
    format_table,
    latest_step,
    missing_evals,
    probe,
    read_json,
    stage_lock,
    stage_record,
    write_summary,
)
from mmtrain.utils.io import atomic_write_json, atomic_write_text

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
"""A stage ended at `stop_after_steps`, before `max_steps`: run again to continue it."""
EXIT_NODE_LOST = 4
"""A stage's processes died with a node of the allocation: the scheduler's to requeue, not the stage's fault."""
OUTCOMES = {0: "done", EXIT_FAILED: "failed", EXIT_STOPPED: "stopped", EXIT_REQUEUE: "preempted",
            EXIT_NODE_LOST: "node_lost"}
# Return codes of a subprocess stopped by the scheduler's signals (directly, through a shell or srun).
_SIGNALLED = {-10, -15, 128 + 10, 128 + 15, 10, 15}


StageFailureHook = Callable[[Stage, TextIO], None]
"""Called by `run_stage` with a stage that failed (e.g. to cancel the SLURM jobs waiting for it)."""
LostNodeCheck = Callable[[], str | None]
"""Asked by `run_stage` when a stage's processes fail: why the cause is a node lost by the allocation
(e.g. `node mmnode2 is down`), or None for an ordinary failure."""


class PipelineError(UserError, RuntimeError):
    """The pipeline cannot go on; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_pipeline(pipeline: Pipeline, only: str | None = None, restart_from: str | None = None,
                 out: TextIO | None = None, on_failure: Sequence[StageFailureHook] = (),
                 lost_node: LostNodeCheck | None = None) -> int:
    """Run the recipe's stages in order (or only the stage `only`), skipping completed ones.

    Args:
        only: run just this stage; the stages it inherits from must be done.
        restart_from: move this stage's folder and every later stage's aside first, so they rerun
            from scratch.
        on_failure: called with a stage that failed and the output stream (the SLURM layer cancels
            the jobs that wait for it).
        lost_node: tells a lost node from a failure (the SLURM layer asks the scheduler); a stage
            whose processes died with a node ends `node_lost`, resumable, and no `on_failure` hook runs.

    Returns:
        0 when every stage run is done, EXIT_STOPPED when one ended at `stop_after_steps`.

    Raises:
        PipelineError: a stage failed (exit_code 1), or the run folder disagrees with the recipe
            (exit_code 2): a completed stage's config changed, an inherited stage is not done.
    """
    out = out or sys.stdout
    selected = [pipeline.stage(only)] if only else list(pipeline.stages)
    if restart_from is not None:
        move_aside(pipeline, restart_from, out)
    _check_consistency(pipeline, selected)
    for note in orphan_folders(pipeline):
        print(note, file=out)
    pipeline.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pipeline.output_dir / "recipe.yaml", pipeline.recipe_text)
    write_summary(pipeline)
    total = len(pipeline.stages)
    try:
        for stage in selected:
            state = probe(stage)
            tag = f"[{stage.index}/{total}] {stage.name}"
            if state.done and not missing_evals(stage):
                loss = state.record.get("train_loss")
                loss_text = f", train loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
                print(f"skip {tag}: done (step {state.record.get('steps')}/{stage.config.max_steps}{loss_text}) "
                      f"in {stage.folder}", file=out, flush=True)
                continue
            code = run_stage(pipeline, stage, out, on_failure, lost_node)
            write_summary(pipeline)
            if code != 0:
                return code
    finally:
        data = write_summary(pipeline)
        print("\n" + format_table(data), file=out, flush=True)
        print(f"summary: {pipeline.output_dir / 'summary.json'}", file=out, flush=True)
    return 0


def run_stage(pipeline: Pipeline, stage: Stage, out: TextIO, on_failure: Sequence[StageFailureHook] = (),
              lost_node: LostNodeCheck | None = None) -> int:
    """Train one stage (resuming if it has checkpoints), run its evals, write its stage.json.

    The attempt is recorded in the run's ledger (`stage_start`, a `task` per subprocess,
    `stage_end`). Under SLURM, a stage stopped by the scheduler's warning signal requeues its job
    (it resumes from the checkpoint written on the signal); a failed stage is handed to every
    `on_failure` hook, unless `lost_node` says its processes died with a node (the scheduler
    requeues such a job itself; the stage resumes from its last complete checkpoint).
    """
    tag = f"[{stage.index}/{len(pipeline.stages)}] {stage.name}"
    ledger = stage_ledger(pipeline, stage)
    started = time.monotonic()
    ledger.write("stage_start", nprocs=stage.launch.nprocs, launcher=stage.launch.launcher,
                 step=latest_step(stage.folder), max_steps=stage.config.max_steps, folder=str(stage.folder))
    code: int | None = None
    try:
        with stage_lock(stage.folder):
            code = _run_stage_locked(pipeline, stage, tag, out, ledger, lost_node)
    except StageBusyError as exc:
        code = EXIT_FAILED
        raise PipelineError(f"stage {stage.name}: {exc}; wait for it to end", EXIT_FAILED) from None
    finally:
        with _signals_deferred():  # the scheduler's SIGTERM follows a lost node closely: record the end first
            # Stopped by a signal (the runner's, or its ranks' checkpoint-and-requeue exit): was it the
            # node failure's? SLURM then requeues the job itself.
            if code in (None, EXIT_REQUEUE) and lost_node is not None:
                lost = lost_node()
                if lost:
                    code = _lost_node(stage, "processes were stopped", lost)
            record = read_json(stage.folder / STAGE_FILE) or {}
            ledger.write("stage_end", outcome=OUTCOMES.get(code, "failed") if code is not None else "interrupted",
                         returncode=code, wall_s=round(time.monotonic() - started, 3),
                         step=latest_step(stage.folder),
                         message=record.get("message") if code in (EXIT_FAILED, EXIT_NODE_LOST) else None)
    if code == EXIT_REQUEUE:
        _requeue(stage, out)
    elif code == EXIT_FAILED:  # not EXIT_NODE_LOST: the stages waiting for this one still can run
        for hook in on_failure:
            hook(stage, out)
    return code


def stage_ledger(pipeline: Pipeline, stage: Stage) -> Ledger:
    """A new attempt of `stage` in the run's ledger (MMTRAIN_LEDGER, set by submitted jobs, or the run folder's)."""
    path = Path(os.environ.get(ENV_LEDGER) or pipeline.output_dir / LEDGER_FILE)
    job = slurm_job()
    if job["gpus"] is None and not job["job_id"]:
        job["gpus"] = stage.launch.nprocs  # a local run: one device (or CPU process) per rank
    return Ledger(path=path, run=path.parent.name, stage=stage.name, attempt=new_attempt_id(),
                  variant=os.environ.get(ENV_VARIANT) or None, job=job)


def _requeue(stage: Stage, out: TextIO) -> None:
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        print(f"stage {stage.name} stopped on a signal after checkpointing; run again to resume it",
              file=sys.stderr, flush=True)
        return
    print(f"stage {stage.name} stopped on a signal after checkpointing: requeueing job {job_id}", file=out, flush=True)
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: scontrol requeue {job_id} failed: {result.stderr.strip()}; resubmit the stage to resume "
              f"(mmtrain submit ... --stage {stage.name})", file=sys.stderr, flush=True)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done (then arrive as usual)."""
    blocked = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _run_stage_locked(pipeline: Pipeline, stage: Stage, tag: str, out: TextIO, ledger: Ledger,
                      lost_node: LostNodeCheck | None = None) -> int:
    folder = stage.folder
    close_dangling_attempts(folder)
    (folder / STAGE_FILE).unlink(missing_ok=True)  # not done until this run says so
    for name in stage.requires:
        required = pipeline.stage(name)
        if not required.final_checkpoint.is_dir():
            raise PipelineError(f"stage {stage.name} inherits from {name}, whose final checkpoint "
                                f"{required.final_checkpoint} is missing; rerun with --restart-from {name}")
    dump_config(stage.config, stage.config_file)
    max_steps = stage.config.max_steps
    step = latest_step(folder)
    if step != max_steps:
        start = "from scratch" if step is None else f"resuming from step {step}"
        print(f"==> {tag}: training to step {max_steps} ({start}) in {folder}", file=out, flush=True)
        command = train_command(stage)
        code = run_logged(command, folder / "logs" / "train.log", folder, "train", out, ledger, stage.launch.nprocs)
        step = latest_step(folder)
        if code == EXIT_REQUEUE or (code in _SIGNALLED and step is not None):
            return EXIT_REQUEUE
        if code != 0:
            return _fail(pipeline, stage, f"training exited with code {code}", folder / "logs" / "train.log",
                         lost_node)
        if step != max_steps:
            if stage.config.stop_after_steps is not None and step is not None:
                message = (f"stage {stage.name} stopped at step {step} of {max_steps} (stop_after_steps="
                           f"{stage.config.stop_after_steps}); run again to continue it")
                atomic_write_json(folder / STAGE_FILE, stage_record(stage, "stopped", message))
                print(message, file=sys.stderr, flush=True)
                return EXIT_STOPPED
            return _fail(pipeline, stage, f"training ended without a checkpoint at step {max_steps} "
                                          f"(latest: {step})", folder / "logs" / "train.log")
    else:
        print(f"==> {tag}: training already finished at step {max_steps}", file=out, flush=True)
    for spec in stage.evals:
        result_file = stage.eval_output(spec)
        if result_file.is_file():
            print(f"skip {tag} eval {spec.name}: {result_file} exists", file=out, flush=True)
            continue
        log = folder / "logs" / f"eval-{spec.name}.log"
        try:
            data = _resolve_data(spec.data)
        except ValueError as exc:
            return _fail(pipeline, stage, f"eval {spec.name}: {exc}", None)
        print(f"==> {tag}: eval {spec.name} on {data}", file=out, flush=True)
        code = run_logged(eval_command(stage, spec, data=data), log, folder, f"eval:{spec.name}", out, ledger,
                          stage.launch.nprocs)
        if code in _SIGNALLED:  # the scheduler's warning during an evaluation: redo it after the requeue
            return EXIT_REQUEUE
        if code != 0:
            return _fail(pipeline, stage, f"eval {spec.name} exited with code {code}", log, lost_node)
        if read_json(result_file) is None:
            return _fail(pipeline, stage, f"eval {spec.name} wrote no JSON object to {result_file}", log)
    atomic_write_json(folder / STAGE_FILE, stage_record(stage, "done"))
    print(f"==> {tag}: done", file=out, flush=True)
    return 0


def _fail(pipeline: Pipeline, stage: Stage, what: str, log: Path | None,
          lost_node: LostNodeCheck | None = None) -> int:
    lost = lost_node() if lost_node is not None else None
    if lost:
        return _lost_node(stage, what, lost)
    message = f"stage {stage.name} failed: {what}; stage folder: {stage.folder}"
    if log is not None:
        message += f", log: {log}"
    atomic_write_json(stage.folder / STAGE_FILE, stage_record(stage, "failed", message))
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def _lost_node(stage: Stage, what: str, lost: str) -> int:
    """Record that the stage's processes died with a node (`lost` says which): resumable, not failed."""
    step = latest_step(stage.folder)
    resume = f"the checkpoint of step {step}" if step is not None else "the start"
    message = (f"stage {stage.name} lost a node: {lost}; its {what}. The stage resumes from {resume} when the job "
               "runs again (SLURM requeues a requeueable job on a node failure; otherwise resubmit it)")
    atomic_write_json(stage.folder / STAGE_FILE, stage_record(stage, "interrupted", message))
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_NODE_LOST


def _resolve_data(data: str) -> str:
    if not data.startswith(ASSET_PREFIX):
        return data

    try:
        return resolve_asset_reference(data, "data")
    except AssetError as exc:
        raise ValueError(str(exc)) from None


def run_logged(command: list[str], log: Path, folder: Path, kind: str, out: TextIO, ledger: Ledger | None = None,
               nprocs: int = 1) -> int:
    """Run `command`, copying its output to `out` and appending it to `log`; record the attempt
    (in the stage's attempts.jsonl and, as a `task`, in the run's ledger).

    An interrupt (Ctrl-C, SIGTERM turned into SystemExit) stops the subprocess before re-raising.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    attempt = begin_attempt(folder, kind)
    started = time.monotonic()
    code: int | None = None
    try:
        code = _tee(command, log, out, ledger.environment() if ledger is not None else {})
        return code
    finally:
        port = rendezvous_port(command)
        if port is not None:
            remove_shm_allreduce_buffers(port)
        wall = time.monotonic() - started
        end_attempt(folder, attempt, code, wall)
        if ledger is not None:
            ledger.write("task", kind=kind, nprocs=nprocs, returncode=code, wall_s=round(wall, 3))


def _tee(command: list[str], log: Path, out: TextIO, extra_env: dict[str, str]) -> int:
    env = {**os.environ, **extra_env}
    env["PYTHONUNBUFFERED"] = "1"
    # The subprocess imports the same mmtrain as this process, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    binary = getattr(out, "buffer", None)
    with open(log, "ab") as handle:
        handle.write(f"\n==> {datetime.now().isoformat(timespec='seconds')}  {shlex.join(command)}\n".encode())
        handle.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                chunk = process.stdout.read1(65536)
                if not chunk:
                    break
                handle.write(chunk)
                handle.flush()
                if binary is not None:
                    binary.write(chunk)
                else:
                    out.write(chunk.decode(errors="replace"))
                out.flush()
            return process.wait()
        except BaseException:
            _stop(process)
            raise


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------- checks
def _check_consistency(pipeline: Pipeline, selected: list[Stage]) -> None:
    """Refuse to mix results: stale stages (config changed) among those used, unfinished inherited stages."""
    needed: list[Stage] = []

    def add(stage: Stage) -> None:
        if all(s.name != stage.name for s in needed):
            for name in stage.requires:
                add(pipeline.stage(name))
            needed.append(stage)

    for stage in selected:
        add(stage)
    selected_names = {s.name for s in selected}
    for stage in needed:
        state = probe(stage)
        if state.stale:
            what = "completed" if state.done else f"was trained to step {state.step}"
            raise PipelineError(
                f"{pipeline.recipe_path}: stage {stage.name} {what} in {stage.folder} with a different config; "
                f"changed since: {'; '.join(state.changes)}. Rerun it and the stages after it with "
                f"`--restart-from {stage.name}` (the old folders are kept aside), or undo the change")
        if stage.name not in selected_names and not state.done:
            user = next(s.name for s in selected if stage.name in _all_requires(pipeline, s))
            raise PipelineError(
                f"stage {user} inherits from {stage.name}, which is not done ({state.describe(stage)}); run it "
                f"first: mmtrain run {pipeline.recipe_path} --stage {stage.name}")


def _all_requires(pipeline: Pipeline, stage: Stage) -> set[str]:
    found: set[str] = set()
    for name in stage.requires:
        found |= {name} | _all_requires(pipeline, pipeline.stage(name))
    return found


def move_aside(pipeline: Pipeline, name: str, out: TextIO) -> list[Path]:
    """Rename the folder of stage `name` and of every later stage to `.<NN>-<name>.old-<timestamp>`.

    Nothing is deleted: the old folders stay next to the new ones until removed by hand.
    """
    first = pipeline.stage(name)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    moved = []
    for stage in pipeline.stages[first.index - 1:]:
        if not stage.folder.exists():
            continue
        if probe(stage).status == "running":
            raise PipelineError(f"stage {stage.name} is being run by another process; cannot move {stage.folder}")
        target = stage.folder.with_name(f".{stage.folder.name}.old-{stamp}")
        stage.folder.rename(target)
        moved.append(target)
        print(f"moved {stage.folder} aside to {target} (delete it when no longer needed)", file=out, flush=True)
    return moved


def orphan_folders(pipeline: Pipeline) -> list[str]:
    """Notes about stage-like folders in the run folder that no stage of the recipe owns."""
    if not pipeline.output_dir.is_dir():
        return []
    owned = {s.folder.name for s in pipeline.stages}
    notes = []
    for path in sorted(pipeline.output_dir.iterdir()):
        if path.is_dir() and path.name[:2].isdigit() and path.name[2:3] == "-" and path.name not in owned:
            notes.append(f"note: {path} is not a stage folder of this recipe (a stage renamed or moved?); "
                         "it is left alone")
    return notes


# ---------------------------------------------------------------------------------------------- plan
def format_plan(pipeline: Pipeline) -> str:
    """The stages, their folders, their state, what they inherit and the commands they would run."""
    lines = [f"recipe {pipeline.name} ({pipeline.recipe_path}): {len(pipeline.stages)} stages in {pipeline.output_dir}"]
    for stage in pipeline.stages:
        state = probe(stage)
        lines.append(f"[{stage.index}] {stage.name}: {state.describe(stage)}")
        lines.append(f"    folder:   {stage.folder}")
        launch = ("1 process" if stage.launch.nprocs == 1
                  else f"{stage.launch.nprocs} processes under {stage.launch.launcher}")
        lines.append(f"    train:    {stage.config.max_steps} steps, {launch}: "
                     f"{shlex.join(train_command(stage, port='PORT'))}")
        for spec in stage.inherit:
            modules = ", ".join(spec.modules) if spec.modules else "every trained tensor"
            via = " (projector through a word converter)" if spec.word_converter is not None else ""
            lines.append(f"    inherits: {modules} from {spec.stage}{via}")
        for spec in stage.evals:
            done = " (done)" if stage.eval_output(spec).is_file() else ""
            lines.append(f"    eval:     {spec.name}{done}: {shlex.join(eval_command(stage, spec, port='PORT'))}")
    lines += orphan_folders(pipeline)
    return "\n".join(lines)
