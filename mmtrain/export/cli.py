"""`mmtrain export RUN_OR_CHECKPOINT --out DIR [--format hf]`: a folder transformers loads as LLaVA.

    mmtrain export runs/demo/02-caption --out exported/demo
    python -c "from transformers import LlavaForConditionalGeneration as L; L.from_pretrained('exported/demo')"

Runs in one process; a ZeRO-3 run's weights are gathered for writing.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import mmtrain.engine  # noqa: F401  (selects DeepSpeed's accelerator before deepspeed is imported)
from mmtrain.errors import report_user_errors


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Export a trained VLM to the Hugging Face LLaVA format.")
    parser.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (its latest checkpoint) or OUTPUT_DIR/checkpoints/step_XXXXXXXX")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers' LlavaForConditionalGeneration")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain export") -> int:
    """Export; exit 0 when done, 2 for a user error (a target, a model that does not map, an existing --out)."""
    args = build_parser(prog).parse_args(argv)
    # dispatch: import only what this command runs
    from transformers import AutoTokenizer

    # dispatch: the command's own modules
    from mmtrain.config.paths import RunDir
    from mmtrain.cost.report import ReportError, run_report
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.export.card import model_card
    from mmtrain.export.writer import export_llava

    loaded = load_for_eval(args.target)
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if loaded.zero3:
        import deepspeed  # heavy; only under ZeRO-3

        gather = deepspeed.zero.GatheredParameters(list(loaded.model.parameters()))
    llm = loaded.cfg.model.llm
    tokenizer = AutoTokenizer.from_pretrained(llm.tokenizer or llm.name_or_path, trust_remote_code=llm.trust_remote_code)
    cost = None
    try:
        cost = run_report(loaded.run_dir, wait_s=0.0)["total"]
    except (ReportError, OSError, ValueError):
        pass  # no ledger: the card says so
    parameters = RunDir(loaded.run_dir).params
    table = parameters.read_text() if parameters.is_file() else "(no parameter table)"

    def card(llava_config):
        return model_card(loaded.run_dir, loaded.step, loaded.cfg, llava_config, table, cost, Path(args.out).name)

    with gather:
        folder = export_llava(loaded.model, loaded.cfg, tokenizer, args.out, overwrite=args.overwrite, card=card)
    print(f"exported {loaded.checkpoint} (step {loaded.step}) to {folder} (transformers LlavaForConditionalGeneration)")
    return 0
