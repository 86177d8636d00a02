"""Entry point: `python -m mmtrain.train CONFIG.yaml [--set key=value ...]`.

Works as a single process, under `deepspeed --num_gpus N --module mmtrain.train ...`, under
`torchrun --nproc_per_node N -m mmtrain.train ...` and under `srun` (ranks from SLURM variables).
"""

from __future__ import annotations

import argparse
import sys

import mmtrain.engine  # noqa: F401  (selects DeepSpeed's accelerator before deepspeed is imported)
from mmtrain.config import ConfigError, load_config


def build_parser(prog: str = "python -m mmtrain.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a VLM on a frozen LLM under DeepSpeed.")
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set max_steps=50 optim.lr=1e-3")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m mmtrain.train") -> int:
    args = build_parser(prog).parse_args(argv)
    from mmtrain.engine.preemption import EXIT_REQUEUE, StopRequest

    stop_request = StopRequest().install()  # before the slow imports: a warning signal is never lost
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mmtrain.data import BadSampleError, ManifestError
    from mmtrain.engine.ds_config import DeepSpeedConfigError
    from mmtrain.engine.trainer import Trainer
    from mmtrain.models import IncompatibleCheckpointError
    from mmtrain.methods.vpgtrans.converter import ConverterError

    try:
        trainer = Trainer(cfg, stop_request)
        trainer.fit()
        if trainer.stopped_by_signal:
            print(f"stopped by {trainer.stop_request.name or 'a stop signal'} after checkpointing; "
                  f"exit {EXIT_REQUEUE}: requeue or rerun to resume", file=sys.stderr)
            return EXIT_REQUEUE
    except (BadSampleError, ManifestError, DeepSpeedConfigError, IncompatibleCheckpointError, ConverterError,
            FileNotFoundError) as exc:
        # The user's input is at fault: say what and where, without a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
