"""`mmtrain submit RECIPE.yaml [...]` and `mmtrain status RUN [--wait S] [--json]`.

submit: render each stage's sbatch script into `<run>/slurm/`, then sbatch them in dependency
order and print the job ids (`--dry-run` renders and prints the sbatch commands only). Exit codes:
0 submitted; 1 sbatch refused a job (those already submitted by this call are cancelled);
2 a recipe, option or usage error.
status: each stage's jobs and states; exit 0 when every job completed, 1 when one failed or was
cancelled, 3 while jobs are still pending or running.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmtrain.errors import report_user_errors
from mmtrain.slurm.options import CLI_KEYS

EPILOG = """\
Job options come from the recipe's `slurm:` block (and each stage's), overridden by the flags
here. A stage waits (afterok) for the stages it inherits weights from; stages already done in the
run folder are not submitted. --array-over KEY=V1,V2 makes every stage a job array with one task
per value (several flags: every combination), each task in <run>/variants/<i>-<value>/, task i of
a stage waiting for task i of the stages it inherits from (aftercorr)."""


def build_submit_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Submit a recipe's stages as SLURM jobs.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="render the scripts and print the sbatch commands")
    parser.add_argument("--array-over", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="sweep a run-config key as a job array (seeds, LLMs, cuts)")
    parser.add_argument("--stage", action="append", metavar="NAME", help="submit only these stages")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override run-config keys (as `mmtrain run --set`)")
    parser.add_argument("--output-dir", metavar="DIR", help="run in DIR instead of the recipe's output_dir")
    for key in CLI_KEYS:
        kind = int if key in ("nodes", "gpus_per_node", "cpus_per_task", "throttle") else str
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None,
                            help=f"slurm.{key} for every stage")
    return parser


@report_user_errors
def submit_main(argv: list[str] | None = None, prog: str = "mmtrain submit") -> int:
    args = build_submit_parser(prog).parse_args(argv)
    # dispatch: import only what this command runs
    from mmtrain.pipeline.recipe import load_recipe
    from mmtrain.slurm.render import parse_array_over
    from mmtrain.slurm.submit import SubmitError, plan, submit

    # A recipe, option or --array-over error is a UserError (ConfigError): reported as `error: ...`, exit 2.
    array_over = parse_array_over(args.array_over)
    pipeline = load_recipe(args.recipe, args.overrides, args.output_dir)
    for name in args.stage or []:
        pipeline.stage(name)
    command_line = {key: getattr(args, key) for key in CLI_KEYS}
    jobs, tasks = plan(pipeline, command_line, args.overrides, array_over, args.stage)
    if not jobs:
        print(f"nothing to submit: every stage of {pipeline.recipe_path} is done in {pipeline.output_dir}")
        return 0
    try:
        record = submit(pipeline, jobs, tasks, args.overrides, args.dry_run, sys.stdout)
    except SubmitError as exc:  # sbatch refused a job or is unreachable: exit 1, as documented above
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = pipeline.output_dir / "slurm"
    if args.dry_run:
        print(f"[dry run] scripts in {where}; nothing submitted")
    else:
        print(f"jobs: {where / 'jobs.json'}; follow with: mmtrain status {pipeline.output_dir}")
    return 0 if record else 1


@report_user_errors
def status_main(argv: list[str] | None = None, prog: str = "mmtrain status") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Show the SLURM jobs of a submitted run.")
    parser.add_argument("run", help="the run folder (the recipe's output_dir)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="poll until every job has ended, for at most this long")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    # dispatch: import only what this command runs
    from mmtrain.slurm.status import format_status, run_status

    summary = run_status(args.run, args.wait)  # StatusError (a UserError): not submitted, or no sacct here
    print(json.dumps(summary, indent=2) if args.json else format_status(summary))
    if not summary["final"]:
        return 3
    return 0 if summary["ok"] else 1
