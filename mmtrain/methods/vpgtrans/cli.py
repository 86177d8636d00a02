"""`mmtrain transfer converter | merge | speedup`: VPGTrans's tools on the command line.

    mmtrain transfer converter --source SRC_LLM --target TGT_LLM --corpus captions.jsonl --out conv.safetensors
    mmtrain transfer merge --checkpoint SRC_RUN_OR_CKPT --converter conv.safetensors --out merged.safetensors
    mmtrain transfer speedup VPGTRANS_RUN TFS_RUN [--metric val_loss] [--out report.json]

In a recipe the converter is an `inherit` option (`word_converter: {...}`): fitted when the stage
starts and counted in its compute. These commands do the same steps by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from mmtrain.assets.registry import resolve_asset_reference as _resolve
from mmtrain.errors import EXIT_USER_ERROR, report_user_errors
from mmtrain.methods.vpgtrans.config import WordConverterConfig

_DEFAULTS = WordConverterConfig()


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="VPGTrans: transfer a VPG to another LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("converter", help="fit the word converter between two LLMs' embedding spaces")
    conv.add_argument("--source", required=True, help="source LLM folder (or asset:NAME)")
    conv.add_argument("--target", required=True, help="target LLM folder (or asset:NAME)")
    conv.add_argument("--source-tokenizer", help="the source LLM's tokenizer folder, if not --source")
    conv.add_argument("--target-tokenizer", help="the target LLM's tokenizer folder, if not --target")
    conv.add_argument("--corpus", required=True, nargs="+", help="manifests (.jsonl) and/or text files")
    conv.add_argument("--out", required=True, help="converter file to write (.safetensors); a .json report beside it")
    conv.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    conv.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="texts per SGD step")
    conv.add_argument("--epochs", type=int, default=_DEFAULTS.epochs, help="(official: 5; 8 across model families)")
    conv.add_argument("--holdout", type=float, default=_DEFAULTS.holdout)
    conv.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    conv.add_argument("--match-norm", action="store_true",
                      help="scale the fitted map to the target embeddings' mean norm (not in the official recipe)")

    merge = sub.add_parser("merge", help="compose a converter with a checkpoint's projector")
    merge.add_argument("--checkpoint", required=True, help="source run folder, checkpoint folder or .safetensors")
    merge.add_argument("--converter", required=True)
    merge.add_argument("--out", required=True, help="merged trainable-weights file (.safetensors)")

    speed = sub.add_parser("speedup", help="VPGTrans's speed-up over training from scratch")
    speed.add_argument("vpgtrans_run")
    speed.add_argument("tfs_run")
    speed.add_argument("--metric", action="append", help="validation metric(s) (default: all both runs record)")
    speed.add_argument("--out", help="write the report (curves included) as JSON here")
    return parser


def _converter(args: argparse.Namespace) -> int:
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoTokenizer

    # dispatch: import only what this command runs
    from mmtrain.methods.vpgtrans.converter import corpus_texts, fit_word_converter, pair_tokens, save_converter
    from mmtrain.methods.vpgtrans.embeddings import read_embedding_table
    from mmtrain.utils.io import atomic_write_json

    source, target = _resolve(args.source, "--source"), _resolve(args.target, "--target")
    corpus = [_resolve(c, "--corpus") for c in args.corpus]
    settings = WordConverterConfig(source_llm=source, corpus=corpus, lr=args.lr, batch_size=args.batch_size,
                                   epochs=args.epochs, holdout=args.holdout, seed=args.seed,
                                   match_norm=args.match_norm)
    source_tokenizer = AutoTokenizer.from_pretrained(_resolve(args.source_tokenizer or source, "--source-tokenizer"))
    target_tokenizer = AutoTokenizer.from_pretrained(_resolve(args.target_tokenizer or target, "--target-tokenizer"))
    pairs = pair_tokens(corpus_texts(corpus), source_tokenizer, target_tokenizer)
    print(f"{pairs.texts_kept}/{pairs.texts_total} texts usable "
          f"({'same tokenizer: pairs by token id' if pairs.same_tokenizer else 'different tokenizers: equal-length texts'})")
    converter, report = fit_word_converter(read_embedding_table(source), read_embedding_table(target), pairs, settings,
                                           log=print)
    record = {"source_llm": source, "target_llm": target, "corpus": corpus, **dataclasses.asdict(report)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_converter(converter, out, record)
    atomic_write_json(out.with_suffix(".json"), record)
    print(f"held-out cosine {report.heldout_cosine:.4f} (before fitting {report.heldout_cosine_initial:.4f}; "
          f"training pairs {report.train_cosine:.4f}) over {report.pairs_heldout} held-out token pairs; "
          f"{report.steps} SGD steps in {report.fit_seconds:.1f} s")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    # dispatch: import only what this command runs
    from mmtrain.methods.vpgtrans.merge import merge_checkpoint

    shapes = merge_checkpoint(args.checkpoint, args.converter, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v)}" for k, v in sorted(shapes.items()) if k.startswith("projector")))
    print("use it as a run's init: init: [{path: " + args.out + "}]")
    return 0


def _speedup(args: argparse.Namespace) -> int:
    # dispatch: import only what this command runs
    from mmtrain.cost.curve import folder_compute
    from mmtrain.methods.vpgtrans.speedup import format_report, speedup_report
    from mmtrain.utils.io import atomic_write_json

    report = speedup_report(args.vpgtrans_run, args.tfs_run, args.metric, compute_of=folder_compute)
    print(format_report(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"report: {args.out}")
    return 0


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain transfer") -> int:
    """Run a VPGTrans tool; a UserError (ConverterError, EmbeddingReadError, SpeedupError, an `asset:`
    reference that cannot be resolved...) or a missing file prints `error: ...` and exits 2."""
    args = build_parser(prog).parse_args(argv)
    handlers = {"converter": _converter, "merge": _merge, "speedup": _speedup}
    try:
        return handlers[args.command](args)
    except FileNotFoundError as exc:  # a checkpoint, converter or corpus file that is not there
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
