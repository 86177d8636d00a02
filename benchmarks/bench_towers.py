"""Which vision tower and resampler make the best demo: MobileNetV2 vs DINOv2-S, MLP vs Q-Former
(configs/towers/compare.yaml), side by side in one run on the demo's data, LLM, steps and seed.

For each arm: trainable parameters, the final train loss, the held-out caption loss with the picture,
with none and with another photo's picture, CIDEr-D of greedy captions, the frozen LLM's text
perplexity, the median step time and the wall time of training and evaluation (2-core CPU).

    python benchmarks/bench_towers.py                 # run what is missing (resumable), then report
    python benchmarks/bench_towers.py --report-only

Writes benchmarks/results/towers.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (  # noqa: E402
    environment, recipe_stage_folders, run_mmtrain, save_json, trainable_parameters, training_record,
)

RECIPE = REPO / "configs" / "towers" / "compare.yaml"
ASSETS = ["tuxpaint", "captions-mix", "mobilenetv2", "dinov2-small", "smollm2-135m"]
EVAL_NAME = "test"


def stage_timing(output_dir: Path) -> dict[str, dict]:
    """Stage name -> the pipeline's train and eval wall seconds (from `summary.json`)."""
    summary = json.loads((output_dir / "summary.json").read_text())
    return {s["name"]: s.get("timing") or {} for s in summary["stages"]}


def arm_result(folder: Path, timing: dict) -> dict:
    result = json.loads((folder / "eval" / f"{EVAL_NAME}.json").read_text())
    loss = result["loss"]
    examples = result["captions"]["examples"]
    return {**trainable_parameters(folder), **training_record(folder),
            "caption_loss": loss["loss"], "caption_loss_no_image": loss["loss_no_image"],
            "caption_loss_other_image": loss["loss_other_image"], "cider": result["captions"]["cider"],
            "distinct_captions": len({e["prediction"] for e in examples}), "captioned_images": len(examples),
            "text_ppl": result["text"]["ppl"], "train_wall_s": timing.get("train_wall_s"),
            "eval_wall_s": timing.get("eval_wall_s"),
            "examples": [{"image": Path(e["image"]).name, "prediction": e["prediction"],
                          "reference": e["references"][0]} for e in examples[:8]]}


def report(output_dir: Path) -> dict:
    timing = stage_timing(output_dir)
    arms = {}
    for name, folder in recipe_stage_folders(RECIPE, output_dir).items():
        if not (folder / "eval" / f"{EVAL_NAME}.json").is_file():
            print(f"(arm {name}: no results in {folder})")
            continue
        arms[name] = arm_result(folder, timing.get(name, {}))
    return {"recipe": str(RECIPE.relative_to(REPO)), "arms": arms}


def format_report(result: dict) -> str:
    arms = result["arms"]
    base = next(iter(arms.values()), {}).get("train_wall_s")
    lines = [f"{'arm':<18} {'trainable':>10} {'train':>6} {'cap loss':>9} {'no img':>7} {'other':>7} {'CIDEr':>6} "
             f"{'distinct':>8} {'text ppl':>9} {'s/step':>7} {'train wall':>10} {'x first':>7} {'eval wall':>9}"]
    for name, arm in arms.items():
        ratio = arm["train_wall_s"] / base if base and arm["train_wall_s"] else float("nan")
        lines.append(f"{name:<18} {arm['trainable']:>10,} {arm['final_train_loss']:>6.3f} {arm['caption_loss']:>9.3f} "
                     f"{arm['caption_loss_no_image']:>7.3f} {arm['caption_loss_other_image']:>7.3f} "
                     f"{arm['cider']:>6.3f} {arm['distinct_captions']:>4}/{arm['captioned_images']:<3} "
                     f"{arm['text_ppl']:>9.2f} {arm['step_time_s']:>7.2f} {arm['train_wall_s'] or 0:>9.0f}s "
                     f"{ratio:>7.2f} {arm['eval_wall_s'] or 0:>8.0f}s")
    for name, arm in arms.items():
        lines.append(f"\n{name}:")
        lines += [f"  {e['image']}: {e['prediction']!r}  (reference: {e['reference']!r})" for e in arm["examples"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "towers"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    if not args.report_only:
        run_mmtrain(["assets", "prepare", *ASSETS])
        run_mmtrain(["run", str(RECIPE), "--output-dir", str(output_dir)])
    result = report(output_dir)
    result["command"] = "python benchmarks/bench_towers.py"
    result["environment"] = environment()
    save_json(result, "towers.json")
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
