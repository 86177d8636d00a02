"""`mmtrain eval RUN_OR_CHECKPOINT --data MANIFEST [...]`: evaluate a trained model, write JSON.

Runs in one process, or sharded over ranks under a launcher
(`deepspeed --num_gpus 2 --module mmtrain eval RUN --data M --deepspeed ds_configs/zero3.json`).
Results go to `RUN/eval/<name>.json` (or `--out`), and a short table to the terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mmtrain.engine  # noqa: F401  (selects DeepSpeed's accelerator before deepspeed is imported)
from mmtrain.engine.distributed import leave_distributed
from mmtrain.errors import EXIT_USER_ERROR, report_user_errors


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Evaluate a trained VLM on a manifest.")
    parser.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (its latest checkpoint) or OUTPUT_DIR/checkpoints/step_XXXXXXXX")
    parser.add_argument("--data", required=True, help="JSONL manifest to evaluate on (or asset:NAME/file.jsonl)")
    parser.add_argument("--name", help="results name (default: the manifest's file name without .jsonl)")
    parser.add_argument("--out", help="results JSON (default: RUN/eval/<name>.json)")
    parser.add_argument("--max-samples", type=int, help="only the first N samples")
    parser.add_argument("--seeded-sample", action="store_true",
                        help="draw the --max-samples at random with the run's seed, as data.val_samples does (on "
                             "the run's validation manifest: the very samples training validated on)")
    parser.add_argument("--generate", type=int, help="generate for at most N images/questions (default: all; 0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-ablations", action="store_true", help="skip the no-image and mismatched-image losses")
    parser.add_argument("--text", help="plain-text file for the text-only perplexity check")
    parser.add_argument("--text-max-tokens", type=int, default=4096)
    parser.add_argument("--show", type=int, default=5, help="print N generated examples next to their references")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON for the model's placement (default: the run's)")
    parser.add_argument("--graft-llm", metavar="LLM",
                        help="zero-shot grafting: evaluate the run's vision side on this LLM (e.g. the full target "
                             "of the surrogate it was trained with); nothing of the run's LLM is loaded")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override keys of the run's config (e.g. data.max_length=256)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain eval") -> int:
    """Evaluate; exit 0 when done, 2 for a user error (`error: MESSAGE`: a target, manifest, key...)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.seeded_sample and not args.max_samples:
        parser.error("--seeded-sample draws --max-samples samples at random; give --max-samples N too")
    # dispatch: import only what this command runs
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.eval.runner import EvalOptions, evaluate_manifest, format_results
    from mmtrain.utils.io import atomic_write_json

    options = EvalOptions(max_samples=args.max_samples, seeded_sample=args.seeded_sample, generate=args.generate, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, ablations=not args.no_ablations, text=args.text,
                          text_max_tokens=args.text_max_tokens)
    try:
        # dispatch: import only what this command runs
        from mmtrain.assets.registry import resolve_asset_reference

        args.data = resolve_asset_reference(args.data, "--data")
        args.text = resolve_asset_reference(args.text, "--text") if args.text else None
        options.text = args.text
        if args.text and not Path(args.text).is_file():
            raise FileNotFoundError(f"--text {args.text}: no such file")
        if args.graft_llm:
            args.graft_llm = resolve_asset_reference(args.graft_llm, "--graft-llm")
        em = load_for_eval(args.target, args.deepspeed, args.overrides, graft_llm=args.graft_llm)
        result = evaluate_manifest(em, args.data, options)
    except FileNotFoundError as exc:  # --text, or a weights file the checkpoint lacks: the user's to fix
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    result = {"run": str(em.run_dir), "checkpoint": str(em.checkpoint), "step": em.step,
              "world_size": em.world_size, "zero3": em.zero3, "llm": em.cfg.model.llm.name_or_path,
              "grafted": em.grafted, **result}
    if em.rank == 0:
        name = args.name or Path(args.data).name.removesuffix(".jsonl")
        out = Path(args.out) if args.out else em.run_dir / "eval" / f"{name}.json"
        atomic_write_json(out, result)
        print(format_results(result, args.show))
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(leave_distributed(main()))


def build_generate_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Answer a prompt about images (greedy decoding).")
    parser.add_argument("target", metavar="RUN_OR_EXPORT",
                        help="a run folder, a checkpoint folder, or a folder written by `mmtrain export`")
    parser.add_argument("--image", nargs="+", required=True, metavar="PATH",
                        help="image files, folders of images, or manifests (.jsonl, or LLaVA .json arrays: their images)")
    parser.add_argument("--prompt", help="the question (default: a caption, as the run's template asks for one)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="also write {image, prompt, answer} lines to this JSONL file")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON for the model's placement (default: the run's)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


@report_user_errors
def generate_main(argv: list[str] | None = None, prog: str = "mmtrain generate") -> int:
    """Print one answer per image (and write --out); exit 2 for a user error."""
    args = build_generate_parser(prog).parse_args(argv)
    # dispatch: import only what this command runs
    from mmtrain.eval.generate import (
        collect_images,
        generate_with_export,
        is_export,
        prompt_samples,
    )
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.eval.scoring import generate_answers
    from mmtrain.utils.io import atomic_write_text

    images = collect_images(args.image)
    rank = 0
    if is_export(args.target):
        answers = generate_with_export(args.target, images, args.prompt, args.max_new_tokens)
    else:
        em = load_for_eval(args.target, args.deepspeed)
        rank = em.rank
        answers = generate_answers(em, prompt_samples(images, args.prompt), args.batch_size, args.max_new_tokens)
    if rank == 0:
        records = [{"image": str(image), "prompt": args.prompt, "answer": answer}
                   for image, answer in zip(images, answers)]
        for record in records:
            print(f"{record['image']}: {record['answer']}")
        if args.out:
            atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in records))
    return 0
