"""The `mmtrain` console command: train, run (pipelines), eval, submit/status (SLURM), cost, assets, data check."""

from __future__ import annotations

import sys

from mmtrain.errors import report_user_errors

USAGE = """usage: mmtrain COMMAND ...

commands:
  train CONFIG.yaml [--set KEY=VALUE ...]   train a VLM (same as python -m mmtrain.train)
  run RECIPE.yaml [options]                 run a pipeline of stages (train + evaluate), resumable
  eval RUN_OR_CHECKPOINT --data MANIFEST    evaluate a trained model (loss, generation, CIDEr, QA accuracy)
  export RUN_OR_CHECKPOINT --out DIR        write a LLaVA-shaped model as a transformers LLaVA folder
  generate RUN_OR_EXPORT --image PATH ...   answer a prompt (default: a caption) about images, greedily
  transfer converter|merge|speedup ...      VPGTrans: word converter, projector merge, speed-up report
  surrogate trajectory|build ...            LLM surrogates: logit-lens trajectory (the cut), streamed build
  params CONFIG.yaml [--set KEY=VALUE ...]  trainable/frozen parameters per component (meta device, no weights)
  submit RECIPE.yaml [--dry-run] [...]      submit the stages as SLURM jobs (afterok chains, job arrays)
  status RUN [--wait S]                     the SLURM jobs of a submitted run and their states
  cost RUN [--baseline RUN] [...]           GPU-hours, MFU and money per stage (ledger + sacct)
  cost estimate RECIPE --gpus N --gpu-type T   predict GPU-hours and per-GPU memory before submitting
  assets list | prepare [NAME ...]          fetch, verify and cache the real offline assets
  data check MANIFEST [options]             validate a JSONL manifest before training
"""


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Run one command; after a clean end under a multi-process launcher, every rank then leaves the
    process group together (`mmtrain.engine.distributed.leave_distributed`)."""
    exit_code = dispatch(argv)
    if "torch.distributed" in sys.modules:
        # dispatch: only a command that ran distributed has a process group to leave
        from mmtrain.engine.distributed import leave_distributed

        leave_distributed(exit_code)
    return exit_code


def dispatch(argv: list[str] | None = None) -> int:
    """Dispatch to the command's own `main` (each reports its user errors as `error: ...`, exit 2;
    so does `main`, for anything a command lets through)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed --module mmtrain ...` puts --local_rank=N first; the rank comes from the environment.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        # dispatch: import only what this command runs
        from mmtrain.train import main as train_main

        return train_main(rest, prog="mmtrain train")
    if command == "run":
        # dispatch: import only what this command runs
        from mmtrain.pipeline.cli import main as run_main

        return run_main(rest, prog="mmtrain run")
    if command == "eval":
        # dispatch: import only what this command runs
        from mmtrain.eval.cli import main as eval_main

        return eval_main(rest, prog="mmtrain eval")
    if command == "generate":
        # dispatch: import only what this command runs
        from mmtrain.eval.cli import generate_main

        return generate_main(rest, prog="mmtrain generate")
    if command == "export":
        # dispatch: import only what this command runs
        from mmtrain.export.cli import main as export_main

        return export_main(rest, prog="mmtrain export")
    if command == "transfer":
        # dispatch: import only what this command runs
        from mmtrain.methods.vpgtrans.cli import main as transfer_main

        return transfer_main(rest, prog="mmtrain transfer")
    if command == "surrogate":
        # dispatch: import only what this command runs
        from mmtrain.methods.grafting.cli import main as surrogate_main

        return surrogate_main(rest, prog="mmtrain surrogate")
    if command == "params":
        # dispatch: import only what this command runs
        from mmtrain.models.counting import main as params_main

        return params_main(rest, prog="mmtrain params")
    if command == "submit":
        # dispatch: import only what this command runs
        from mmtrain.slurm.cli import submit_main

        return submit_main(rest, prog="mmtrain submit")
    if command == "status":
        # dispatch: import only what this command runs
        from mmtrain.slurm.cli import status_main

        return status_main(rest, prog="mmtrain status")
    if command == "cost":
        # dispatch: import only what this command runs
        from mmtrain.cost.cli import main as cost_main

        return cost_main(rest, prog="mmtrain cost")
    if command == "assets":
        # dispatch: import only what this command runs
        from mmtrain.assets.cli import main as assets_main

        return assets_main(rest, prog="mmtrain assets")
    if command == "data" and rest[:1] == ["check"]:
        # dispatch: import only what this command runs
        from mmtrain.data.check import main as check_main

        return check_main(rest[1:])
    print(f"mmtrain: unknown command {' '.join(argv[:2])!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
