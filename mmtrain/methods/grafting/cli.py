"""`mmtrain surrogate trajectory | build`: choose the cut, then build the surrogate checkpoint.

    mmtrain surrogate trajectory MODEL --texts FILE [--out DIR] [--num-texts 300] [--max-length 128]
    mmtrain surrogate build TARGET --cut K --out DIR [--max-shard-size 2GB]

`trajectory` runs sharded under ZeRO-3 when started by a multi-process launcher
(`deepspeed --num_gpus N --module mmtrain surrogate trajectory ... --deepspeed ds_configs/zero3.json`).
"""

from __future__ import annotations

import argparse
import sys

from mmtrain.engine.distributed import leave_distributed
from mmtrain.errors import report_user_errors


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="LLM surrogates for zero-shot grafting.")
    sub = parser.add_subparsers(dest="command", required=True)

    traj = sub.add_parser("trajectory", help="logit-lens KL per layer; proposes the cut")
    traj.add_argument("model", help="the target LLM's folder (or asset:NAME)")
    traj.add_argument("--texts", required=True, nargs="+",
                      help="text files (one text a line) and/or JSONL manifests (captions, conversation turns)")
    traj.add_argument("--out", default=None, help="folder for trajectory.json and trajectory.png "
                                                  "(default: MODEL's name under runs/trajectory/)")
    traj.add_argument("--num-texts", type=int, default=300, help="use the first N texts (default 300)")
    traj.add_argument("--max-length", type=int, default=128, help="tokens per text, longer ones truncated")
    traj.add_argument("--batch-size", type=int, default=8)
    traj.add_argument("--threshold", type=float, default=None,
                      help="the cut rule's threshold (see docs/surrogates.md); default: the rule's own")
    traj.add_argument("--deepspeed", default=None,
                      help="a ZeRO-3 DeepSpeed JSON: shard the model across the launched ranks")
    traj.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    traj.add_argument("--kl", choices=("true-token", "full"), default="true-token",
                      help="the KL curve the cut uses: true-token (the official quantity: position-normalised "
                           "true-token probabilities) or full (full-vocabulary KL per position)")

    build = sub.add_parser("build", help="stream the target's checkpoint into a surrogate folder")
    build.add_argument("target", help="the target LLM's folder (or asset:NAME): config.json + safetensors")
    build.add_argument("--cut", type=int, required=True,
                       help="K: keep layers 0..K-1, the translator starts as a copy of layer K, then the last layer")
    build.add_argument("--out", required=True, help="the surrogate's folder (must not exist)")
    build.add_argument("--max-shard-size", default="2GB", help="largest output shard (e.g. 500MB, 5GB)")
    return parser


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain surrogate") -> int:
    """Run `trajectory` or `build`; a UserError (TrajectoryError, SurrogateBuildError, an `asset:`
    reference that cannot be resolved) prints `error: ...` and exits 2."""
    # dispatch: import only what this command runs
    from mmtrain.assets.registry import resolve_asset_reference as _resolve

    args = build_parser(prog).parse_args(argv)
    if args.command == "trajectory":
        # dispatch: import only what this command runs
        from mmtrain.methods.grafting.trajectory import run_trajectory

        args.model = _resolve(args.model, "MODEL")
        args.texts = [_resolve(t, "--texts") for t in args.texts]
        run_trajectory(args)
        return 0
    # dispatch: import only what this command runs
    from mmtrain.methods.grafting.build import build_surrogate, parse_size

    info = build_surrogate(_resolve(args.target, "TARGET"), args.cut, args.out,
                           max_shard_bytes=parse_size(args.max_shard_size))
    print(info.summary())
    return 0


if __name__ == "__main__":
    sys.exit(leave_distributed(main()))
