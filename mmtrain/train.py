"""Entry point: `python -m mmtrain.train CONFIG.yaml [--set key=value ...]`.

Works as a single process, under `deepspeed --num_gpus N --module mmtrain.train ...`, under
`torchrun --nproc_per_node N -m mmtrain.train ...` and under `srun` (ranks from SLURM variables).
"""

from __future__ import annotations

import argparse
import sys

import mmtrain.engine  # noqa: F401  (selects DeepSpeed's accelerator before deepspeed is imported)
from mmtrain.config import load_config
from mmtrain.config.rules import check_training
from mmtrain.engine.distributed import explain_collective_failure, leave_distributed
from mmtrain.errors import EXIT_USER_ERROR, report_user_errors


def build_parser(prog: str = "python -m mmtrain.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a VLM on a frozen LLM under DeepSpeed.")
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set max_steps=50 optim.lr=1e-3")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "python -m mmtrain.train") -> int:
    """Train; exit 0 when done, EXIT_REQUEUE when stopped by a signal after checkpointing, 2 for a
    user error (`error: MESSAGE`, no traceback: a config value, a manifest line, a checkpoint...)."""
    args = build_parser(prog).parse_args(argv)
    # dispatch: import only what this command runs
    from mmtrain.engine.preemption import EXIT_REQUEUE, StopRequest

    stop_request = StopRequest().install()  # before the slow imports: a warning signal is never lost
    cfg = load_config(args.config, args.overrides)
    check_training(cfg, args.config)
    # dispatch: import only what this command runs
    from mmtrain.cost.recorder import CostRecorder
    from mmtrain.engine.trainer import Trainer

    try:
        trainer = Trainer(cfg, stop_request, sinks=[CostRecorder.for_run(cfg.output_dir)])
        trainer.fit()
        if trainer.stopped_by_signal:
            print(f"stopped by {trainer.stop_request.name or 'a stop signal'} after checkpointing; "
                  f"exit {EXIT_REQUEUE}: requeue or rerun to resume", file=sys.stderr)
            return EXIT_REQUEUE
    except FileNotFoundError as exc:
        # A file the config names is missing (init weights, a resume folder, a tokenizer...): the user's
        # to fix, wherever it is found (not every reader raises a UserError naming the key yet).
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as exc:
        explain_collective_failure(exc, cfg.collective_timeout_s)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(leave_distributed(main()))
