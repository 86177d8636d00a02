"""Parameter-efficient arms side by side on real weights: MMA router adapters, plain adapters,
projector only, LoRA (configs/mma/compare.yaml).

Frozen pretrained MobileNetV2 -> LaVIN's visual MLP -> frozen SmolLM2-135M-Instruct, trained on the
real multiple-choice questions + Tux Paint captions + text-only prose instructions, each arm with
about the same trainable budget (~0.58M), the same data order and steps. For each arm: accuracy on
the 211 held-out questions (by the likelihood of each option's letter), the question loss with no
image, trainable parameters, time per step, peak memory, and the LLM's text perplexity on held-out
prose before (the untouched LLM) and after training (does the arm keep the LLM's text ability?).

    python benchmarks/bench_mma.py                 # run what is missing (resumable), then report
    python benchmarks/bench_mma.py --report-only

Then, side by side in one run, the router arm's first QUANT_STEPS steps with the LLM in fp32 + AdamW
and with the LLM in 4-bit (bitsandbytes nf4) + 8-bit AdamW: time per step, peak memory, loss.

Writes benchmarks/results/mma.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import recipe_stage_folders, trainable_parameters, training_record  # noqa: E402
from benchmarks.common import run_mmtrain as run  # noqa: E402
RESULTS = REPO / "benchmarks" / "results"
RECIPE = REPO / "configs" / "mma" / "compare.yaml"
ASSETS = ["mcqa", "tuxpaint", "prose", "mobilenetv2", "smollm2-135m"]
EVAL_NAME = "mcqa"
CAPTIONS = ["--data", "asset:tuxpaint/test.jsonl", "--name", "captions", "--max-new-tokens", "12", "--show", "0"]
QUANT_STEPS = 30
QUANT_ARMS = {"fp32 + adamw": [], "4bit + adamw8bit": ["model.llm.quantization=4bit", "optim.name=adamw8bit"]}


def stage_folders(output_dir: Path) -> dict[str, Path]:
    """Arm name -> its stage folder (`NN-name`), in recipe order."""
    return recipe_stage_folders(RECIPE, output_dir)


def reference_prose(path: Path, limit_chars: int = 40_000) -> Path:
    """Out-of-domain English for the text-ability check: the prose paragraphs of the Python language
    reference shipped with the interpreter (`pydoc_data.topics`; no grammar rules or code), which
    nothing in the training mixture resembles (its text-only part is Debian's licence texts)."""
    import pydoc_data.topics

    kept: list[str] = []
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in pydoc_data.topics.topics[key].split("\n\n"):
            lines = paragraph.splitlines()
            prose = lines and all(line[:1].isalpha() and "::=" not in line and ">>>" not in line for line in lines)
            if prose and len(paragraph) > 120:
                kept.append(" ".join(line.strip() for line in lines))
        if sum(len(p) for p in kept) > limit_chars:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    return path


def text_quality(folder: Path, ood_text: Path, run_missing: bool) -> dict:
    """Text-only abilities after training: the loss on held-out text-only instructions (in domain:
    the licence prose the arms trained on) and the perplexity of out-of-domain English."""
    path = folder / "eval" / "text.json"
    if not path.is_file():
        if not run_missing:
            return {}
        run(["eval", str(folder), "--data", "asset:prose/test.jsonl", "--name", "text", "--generate", "0",
             "--text", str(ood_text)])
    result = json.loads(path.read_text())
    return {"text_instruction_loss": result["loss"]["loss"], "ood_text_ppl": result["text"]["ppl"]}


def caption_quality(folder: Path, run_missing: bool) -> dict:
    """Held-out Tux Paint captions (an image-conditioned task every arm trains on): loss with the
    image, with none, with another one's, and CIDEr-D of greedy captions."""
    path = folder / "eval" / "captions.json"
    if not path.is_file():
        if not run_missing:
            return {}
        run(["eval", str(folder), *CAPTIONS])
    result = json.loads(path.read_text())
    return {"caption_loss": result["loss"]["loss"], "caption_loss_no_image": result["loss"]["loss_no_image"],
            "caption_loss_other_image": result["loss"]["loss_other_image"], "cider": result["captions"]["cider"]}


def quality(folder: Path) -> dict:
    result = json.loads((folder / "eval" / f"{EVAL_NAME}.json").read_text())
    choice = result["multiple_choice"]
    return {"accuracy": choice["accuracy"], "chance": choice["chance"],
            "accuracy_by_category": {k: v["accuracy"] for k, v in choice.get("by_category", {}).items()},
            "loss": result["loss"]["loss"], "loss_no_image": result["loss"].get("loss_no_image"),
            "loss_other_image": result["loss"].get("loss_other_image"), "text_ppl": result["text"]["ppl"]}


def report(output_dir: Path, run_missing: bool) -> dict:
    ood_text = output_dir / "reference_prose.txt"
    if not ood_text.is_file():
        reference_prose(ood_text)
    arms = {}
    for name, folder in stage_folders(output_dir).items():
        if not (folder / "eval" / f"{EVAL_NAME}.json").is_file():
            print(f"(arm {name}: no results in {folder})")
            continue
        arms[name] = {**trainable_parameters(folder), **training_record(folder), **quality(folder),
                      **caption_quality(folder, run_missing), **text_quality(folder, ood_text, run_missing)}
    result = {"recipe": str(RECIPE.relative_to(REPO)), "arms": arms}
    if "projector" in arms:  # the LLM is untouched in that arm: its perplexities are the "before"
        result["text_ppl_before"] = arms["projector"]["text_ppl"]
        result["ood_text_ppl_before"] = arms["projector"].get("ood_text_ppl")
    return result


def quantised_side_by_side(output_dir: Path, run_missing: bool) -> dict:
    """The router arm's first QUANT_STEPS steps with a full-precision and a 4-bit frozen LLM."""
    import yaml

    router = yaml.safe_load(RECIPE.read_text())["stages"][0]["set"]
    common = [f"{key}={json.dumps(value)}" for key, value in router.items() if key != "max_steps"]
    rows = {}
    for name, extra in QUANT_ARMS.items():
        folder = output_dir / "quantised" / name.replace(" + ", "-")
        if not (folder / "ranks" / "rank0.json").is_file():
            if not run_missing:
                continue
            run(["train", str(RECIPE.parent / "base.yaml"), "--set", f"output_dir={folder}", f"max_steps={QUANT_STEPS}",
                 "log_every=1", "checkpoint.save_every=0", "progress_bar=false", *common, *extra])
        record = training_record(folder)
        losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        rows[name] = {"step_time_s": record["step_time_s"], "peak_rss_mib": record["peak_rss_mib"],
                      "mean_loss_last_10": statistics.fmean(losses[-10:]), "steps": record["steps"]}
    return rows


def format_report(result: dict) -> str:
    arms = result["arms"]
    base = arms.get("projector", {}).get("step_time_s")
    lines = [f"{'arm':<10} {'trainable':>10} {'mc acc':>7} {'by category (flag-country/capital/picture)':>44} "
             f"{'cap loss':>9} {'no img':>7} {'other':>7} {'CIDEr':>6} {'text ppl':>9} {'ood ppl':>8} "
             f"{'txt loss':>8} {'s/step':>7} {'x proj':>7} {'peak MiB':>9}"]
    for name, arm in arms.items():
        cats = arm["accuracy_by_category"]
        by_cat = " / ".join(f"{cats.get(c, float('nan')):.3f}" for c in ("flag-country", "flag-capital", "picture-caption"))
        ratio = arm["step_time_s"] / base if base else float("nan")
        nan = float("nan")
        lines.append(f"{name:<10} {arm['trainable']:>10,} {arm['accuracy']:>7.3f} {by_cat:>44} "
                     f"{arm.get('caption_loss', nan):>9.3f} {arm.get('caption_loss_no_image', nan):>7.3f} "
                     f"{arm.get('caption_loss_other_image', nan):>7.3f} {arm.get('cider', nan):>6.3f} "
                     f"{arm['text_ppl']:>9.2f} {arm.get('ood_text_ppl', nan):>8.2f} "
                     f"{arm.get('text_instruction_loss', nan):>8.3f} {arm['step_time_s']:>7.2f} {ratio:>7.2f} "
                     f"{arm['peak_rss_mib'] or 0:>9.0f}")
    if "text_ppl_before" in result:
        lines.append(f"perplexities of the untouched LLM (before): held-out licence prose {result['text_ppl_before']:.2f}, "
                     f"out-of-domain reference prose {result.get('ood_text_ppl_before') or float('nan'):.2f}; "
                     f"chance accuracy: {next(iter(arms.values()))['chance']:.3f}")
    quantised = result.get("quantised")
    if quantised:
        lines += ["", f"router arm, first {QUANT_STEPS} steps: {'LLM':<18} {'s/step':>7} {'ratio':>6} "
                  f"{'peak MiB':>9} {'loss (last 10)':>15}"]
        base = next(iter(quantised.values()))["step_time_s"]
        for name, row in quantised.items():
            lines.append(f"{'':<34} {name:<18} {row['step_time_s']:>7.2f} {row['step_time_s'] / base:>6.2f} "
                         f"{row['peak_rss_mib']:>9.0f} {row['mean_loss_last_10']:>15.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "mma"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    if not args.report_only:
        run(["assets", "prepare", *ASSETS])
        run(["run", str(RECIPE), "--output-dir", str(output_dir)])
    result = report(output_dir, run_missing=not args.report_only)
    result["quantised"] = quantised_side_by_side(output_dir, run_missing=not args.report_only)
    result["command"] = "python benchmarks/bench_mma.py"
    from benchmarks.common import environment
    from mmtrain.utils.io import atomic_write_json

    result["environment"] = environment()
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "mma.json", result)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
