"""`mmtrain cost RUN` (what a run cost, in GPU-hours) and `mmtrain cost estimate RECIPE` (what it will).

    mmtrain cost RUN [--baseline RUN] [--price-per-gpu-hour X] [--peak-tflops X] [--out DIR] [--wait S]
    mmtrain cost estimate RECIPE --gpus N --gpu-type T [--nodes N] [--mfu X] [--peak-tflops X]
                                 [--set KEY=VALUE ...] [--out FILE]

The report goes to `<RUN>/cost/` (report.md, report.json, report.png) and its Markdown to stdout.
Exit codes: 0 done; 1 the report could not be written; 2 a usage error, a recipe error, or a run
folder without a ledger. docs/cost.md defines every number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmtrain.errors import EXIT_USER_ERROR, report_user_errors

REPORT_EPILOG = """\
allocated GPU time comes from SLURM accounting (sacct) for attempts that ran as SLURM jobs, else from
the ledger (wall time x GPUs). To predict a recipe's cost before submitting it:
  mmtrain cost estimate RECIPE --gpus N --gpu-type T   (a run folder named `estimate`: pass ./estimate)"""


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def report_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="GPU-hour cost report of a run folder (from its ledger "
                                     "and SLURM accounting).", epilog=REPORT_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder holding ledger.jsonl (a pipeline's output_dir or a training run's)")
    parser.add_argument("--baseline", metavar="RUN", help="another run folder to compare with (e.g. training from "
                        "scratch): its totals and the ratios run/baseline")
    parser.add_argument("--price-per-gpu-hour", type=_non_negative, metavar="X", help="adds cost = GPU-hours x X")
    parser.add_argument("--peak-tflops", type=_positive(float), metavar="X",
                        help="peak TFLOP/s per GPU for MFU (default: the table for the job's GPU type and precision)")
    parser.add_argument("--out", metavar="DIR", help="write report.md/json/png here (default: RUN/cost)")
    parser.add_argument("--wait", type=_non_negative, default=0.0, metavar="S",
                        help="poll sacct up to S seconds until the jobs' records are final (they arrive late)")
    return parser


def estimate_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Predict a recipe's GPU-hours and memory per GPU "
                                     "before submitting it.")
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("--gpus", type=_positive(int), required=True, help="GPUs per stage (all nodes together)")
    parser.add_argument("--gpu-type", required=True, metavar="T", help="e.g. h100, a100, l40s")
    parser.add_argument("--nodes", type=_positive(int), default=1)
    parser.add_argument("--mfu", type=_positive(float), metavar="X", help="assumed model FLOPs utilisation (0-1]")
    parser.add_argument("--peak-tflops", type=_positive(float), metavar="X", help="peak TFLOP/s per GPU")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override run-config keys of every stage, or of one stage with STAGE.KEY=VALUE")
    parser.add_argument("--out", metavar="FILE", help="also write the estimate as JSON; as <run folder>/cost_estimate.json "
                        "`mmtrain cost RUN` shows it next to the actual cost")
    return parser


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain cost") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["estimate"]:
        return _estimate(estimate_parser(f"{prog} estimate").parse_args(argv[1:]))
    return _report(report_parser(prog).parse_args(argv))


def _report(args: argparse.Namespace) -> int:
    # dispatch: import only what this command runs
    from mmtrain.cost.report import REPORT_DIR, build_report, format_markdown, write_report

    # ReportError (a UserError: no ledger in RUN...) is reported by report_user_errors, exit 2.
    report = build_report(args.run, price_per_gpu_hour=args.price_per_gpu_hour, peak_tflops=args.peak_tflops,
                          baseline=args.baseline, wait_s=args.wait)
    out = Path(args.out) if args.out else Path(args.run) / REPORT_DIR
    try:
        paths = write_report(report, out)
    except OSError as exc:
        print(f"error: cannot write the report into {out}: {exc}", file=sys.stderr)
        return 1
    print(format_markdown(report), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    # dispatch: import only what this command runs
    from mmtrain.config.loader import ConfigError
    from mmtrain.cost.estimate import estimate_pipeline, format_estimate
    from mmtrain.pipeline.recipe import load_recipe
    from mmtrain.utils.io import atomic_write_json

    try:
        pipeline = load_recipe(args.recipe, args.overrides)
        result = estimate_pipeline(pipeline, gpus=args.gpus, gpu_type=args.gpu_type, nodes=args.nodes, mfu=args.mfu,
                                   peak_tflops=args.peak_tflops)
    except ConfigError:
        raise  # names the recipe itself; report_user_errors prints it as it is
    except (ValueError, OSError) as exc:
        # estimate.py's plain ValueErrors (an unknown GPU type without --peak-tflops, a model whose FLOPs
        # cannot be counted...) and a missing file: the user's, named after the recipe.
        print(f"error: {args.recipe}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(format_estimate(result))
    if args.out:
        try:
            atomic_write_json(args.out, result)
        except OSError as exc:
            print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
