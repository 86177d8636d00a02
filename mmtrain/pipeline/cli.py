"""`mmtrain run RECIPE.yaml [--stage NAME] [--set KEY=VALUE ...] [--restart-from NAME] [--output-dir DIR] [--plan]`.

Runs a recipe's stages in order in one run folder, skipping completed stages and resuming an
interrupted one. Exit codes: 0 done; 1 a stage failed (the message names it and its folder);
2 a recipe or usage error, or a run folder that disagrees with the recipe; 3 a stage stopped at
`stop_after_steps` (run again to continue); 4 (with --srun) a stage's processes died with a node of the
job (SLURM requeues a requeueable job; the stage resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from mmtrain.config.loader import ConfigError
from mmtrain.errors import EXIT_USER_ERROR, report_user_errors

EPILOG = """\
--set KEY=VALUE applies to every stage; --set STAGE.KEY=VALUE to one stage (e.g. --set align.max_steps=5).
Stage-specific overrides apply after the ones for every stage. Changing a completed stage's config
makes the run refuse to continue until you pass --restart-from STAGE (old folders are moved aside
to <output_dir>/.<NN>-<name>.old-<time>, never deleted)."""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run a pipeline of training stages with their evaluations.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (name, output_dir, defaults, launch, stages)")
    parser.add_argument("--stage", metavar="NAME",
                        help="run only this stage (the stages it inherits from must be done)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override run-config keys of every stage, or of one stage with STAGE.KEY=VALUE")
    parser.add_argument("--restart-from", metavar="NAME",
                        help="move this stage's folder and all later ones aside, then rerun them")
    parser.add_argument("--output-dir", metavar="DIR", help="run in DIR instead of the recipe's output_dir")
    parser.add_argument("--plan", action="store_true", help="print the stages, their folders and state; run nothing")
    parser.add_argument("--srun", action="store_true",
                        help="inside a SLURM job (what `mmtrain submit` runs): start every process as an srun "
                             "step with the job's tasks (SLURM_NTASKS ranks) instead of the recipe's launcher")
    return parser


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain run") -> int:
    args = build_parser(prog).parse_args(argv)
    # dispatch: import only what this command runs
    from mmtrain.pipeline.recipe import load_recipe
    from mmtrain.pipeline.runner import PipelineError, format_plan, run_pipeline
    from mmtrain.slurm.health import allocation_lost_node
    from mmtrain.slurm.submit import cancel_waiting_jobs

    if args.restart_from and (args.plan or args.stage):
        print(f"error: --restart-from does not combine with {'--plan' if args.plan else '--stage'}", file=sys.stderr)
        return EXIT_USER_ERROR
    # A recipe, stage name or --srun error is a UserError: report_user_errors prints it, exit 2.
    pipeline = load_recipe(args.recipe, args.overrides, args.output_dir)
    for name in (args.stage, args.restart_from):
        if name is not None:
            pipeline.stage(name)
    if args.srun:
        use_srun(pipeline)
    if args.plan:
        print(format_plan(pipeline))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_signal)  # stop the running stage's subprocess cleanly
    try:
        return run_pipeline(pipeline, only=args.stage, restart_from=args.restart_from,
                            on_failure=[cancel_waiting_jobs], lost_node=allocation_lost_node if args.srun else None)
    except PipelineError as exc:  # its own exit code: 1 a stage failed, 2 the run folder disagrees
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except TerminatedBySignal as exc:
        print(f"stopped by signal {exc.signum}; run the same command again to resume", file=sys.stderr)
        return 128 + exc.signum


def use_srun(pipeline) -> None:
    """Run every stage's processes as steps of the current SLURM allocation, one per task."""
    # dispatch: import only what this command runs
    from mmtrain.pipeline.recipe import LaunchConfig

    tasks = os.environ.get("SLURM_NTASKS")
    if not tasks or not tasks.isdigit():
        raise ConfigError("--srun: not inside a SLURM job (SLURM_NTASKS is unset); submit with `mmtrain submit` "
                          "or drop --srun to use the recipe's launcher")
    for stage in pipeline.stages:
        stage.launch = LaunchConfig(nprocs=int(tasks), launcher="srun")


class TerminatedBySignal(BaseException):
    """SIGTERM arrived (e.g. a job's time limit): unwinds like Ctrl-C, stopping the running subprocess."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _exit_on_signal(signum: int, frame) -> None:
    raise TerminatedBySignal(signum)


if __name__ == "__main__":
    sys.exit(main())
