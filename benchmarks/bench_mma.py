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

Writes benchmarks/results/mma.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
RECIPE = REPO / "configs" / "mma" / "compare.yaml"
ASSETS = ["mcqa", "tuxpaint", "prose", "mobilenetv2", "smollm2-135m"]
EVAL_NAME = "mcqa"


def run(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print("==> mmtrain " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"mmtrain {' '.join(args)} failed ({proc.returncode})")


def stage_folders(output_dir: Path) -> dict[str, Path]:
    """Arm name -> its stage folder (`NN-name`), in recipe order."""
    import yaml

    stages = yaml.safe_load(RECIPE.read_text())["stages"]
    return {s["name"]: output_dir / f"{i:02d}-{s['name']}" for i, s in enumerate(stages, start=1)}


def trainable_parameters(folder: Path) -> dict:
    """Counts of the stage's saved config, on the meta device."""
    from mmtrain.config import load_config
    from mmtrain.models.counting import count_parameters

    counts = count_parameters(load_config(folder / "config.yaml").model)
    total = next(r for r in counts["components"] if r["component"] == "total")
    return {"trainable": total["trainable"], "by_kind": counts["trainable_by_kind"]}


def training_record(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    times = [r["step_time_s"] for r in train[1:]]  # the first logged step includes warm-up
    rank0 = json.loads((folder / "ranks" / "rank0.json").read_text())
    return {"steps": train[-1]["step"], "final_train_loss": train[-1]["loss"],
            "step_time_s": statistics.median(times), "compute_s": train[-1].get("compute_s"),
            "peak_rss_mib": rank0.get("peak_rss_mib")}


def quality(folder: Path) -> dict:
    result = json.loads((folder / "eval" / f"{EVAL_NAME}.json").read_text())
    choice = result["multiple_choice"]
    return {"accuracy": choice["accuracy"], "chance": choice["chance"],
            "accuracy_by_category": {k: v["accuracy"] for k, v in choice.get("by_category", {}).items()},
            "loss": result["loss"]["loss"], "loss_no_image": result["loss"].get("loss_no_image"),
            "loss_other_image": result["loss"].get("loss_other_image"), "text_ppl": result["text"]["ppl"]}


def report(output_dir: Path) -> dict:
    arms = {}
    for name, folder in stage_folders(output_dir).items():
        if not (folder / "eval" / f"{EVAL_NAME}.json").is_file():
            print(f"(arm {name}: no results in {folder})")
            continue
        arms[name] = {**trainable_parameters(folder), **training_record(folder), **quality(folder)}
    result = {"recipe": str(RECIPE.relative_to(REPO)), "arms": arms}
    if "projector" in arms:  # the LLM is untouched in that arm: its perplexity is the "before"
        result["text_ppl_before"] = arms["projector"]["text_ppl"]
    return result


def format_report(result: dict) -> str:
    arms = result["arms"]
    base = arms.get("projector", {}).get("step_time_s")
    lines = [f"{'arm':<10} {'trainable':>10} {'mc acc':>7} {'by category (flag-country/capital/picture)':>44} "
             f"{'loss':>6} {'no img':>7} {'text ppl':>9} {'s/step':>7} {'x proj':>7} {'peak MiB':>9}"]
    for name, arm in arms.items():
        cats = arm["accuracy_by_category"]
        by_cat = " / ".join(f"{cats.get(c, float('nan')):.3f}" for c in ("flag-country", "flag-capital", "picture-caption"))
        ratio = arm["step_time_s"] / base if base else float("nan")
        lines.append(f"{name:<10} {arm['trainable']:>10,} {arm['accuracy']:>7.3f} {by_cat:>44} {arm['loss']:>6.3f} "
                     f"{arm['loss_no_image'] or float('nan'):>7.3f} {arm['text_ppl']:>9.2f} "
                     f"{arm['step_time_s']:>7.2f} {ratio:>7.2f} {arm['peak_rss_mib'] or 0:>9.0f}")
    if "text_ppl_before" in result:
        lines.append(f"text perplexity of the untouched LLM (before): {result['text_ppl_before']:.2f}; "
                     f"chance accuracy: {next(iter(arms.values()))['chance']:.3f}")
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
    result = report(output_dir)
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
