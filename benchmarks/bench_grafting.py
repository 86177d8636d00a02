"""Zero-shot grafting via an LLM surrogate on real weights: a faithful surrogate first, then the vision side.

Target SmolLM2-135M (30 layers); frozen pretrained DINOv2-S (block 9; its top 3 blocks train in
stage 2), MLP resampler + 2-layer GELU adapter with begin/end-of-image embeddings; captions-mix
captions, text from the debian-text asset (configs/grafting/). Steps:
  1. `mmtrain surrogate trajectory` on 300 held-out debian-text texts: KL per layer (the official
     true-token quantity), the proposed cut K;
  2. `mmtrain surrogate build` for K and for an early cut (before the transition point);
  3. arms:
       - surrogate: configs/grafting/surrogate.yaml on the K surrogate: `text` (the translator alone
         on debian-text until its held-out text loss is near the target's), `stage1` (adapter +
         boundaries + translator on captions mixed with text), `stage2` (translator frozen; adapter +
         top tower blocks); evaluated as the surrogate pair and GRAFTED onto the full target;
       - early-cut: the same on the early-cut surrogate;
       - direct: configs/grafting/direct.yaml, stage1 + stage2 against the full target;
  4. per arm: caption quality (validation and test loss, loss with another image's pixels, CIDEr-D),
     held-out text perplexity, compute, and the cost at equal quality.

    python benchmarks/bench_grafting.py                 # run what is missing (resumable), then report
    python benchmarks/bench_grafting.py --report-only

Compute: training FLOPs and productive process-seconds from the runs' ledgers (`mmtrain.cost.curve`),
the trajectory's FLOPs as `mmtrain surrogate trajectory` counted them. Writes
benchmarks/results/grafting.json (+ the trajectory JSON/PNG next to it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import recipe_stage_folders  # noqa: E402
from benchmarks.common import run_mmtrain as run  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "grafting"
ASSETS = ["captions-mix", "dinov2-small", "smollm2-135m", "debian-text"]
TARGET = "asset:smollm2-135m"
TRAJECTORY_TEXTS = "asset:debian-text/val.txt"
CAPTION_STAGES = ("stage1", "stage2")
"""Stages whose validation is the caption loss (the surrogate arms' `text` stage validates on text)."""


def prepare(early_cut: int | None) -> dict:
    """Trajectory, the cuts and the two surrogates (each step skipped when its output exists)."""
    trajectory_dir = RUNS / "trajectory"
    if not (trajectory_dir / "trajectory.json").is_file():
        run(["surrogate", "trajectory", TARGET, "--texts", TRAJECTORY_TEXTS, "--num-texts", "300",
             "--out", str(trajectory_dir)])
    trajectory = json.loads((trajectory_dir / "trajectory.json").read_text())
    cut = int(trajectory["cut"])
    early = early_cut if early_cut is not None else max(1, cut // 2)
    surrogates = {}
    for name, k in (("surrogate", cut), ("early-cut", early)):
        folder = RUNS / "surrogates" / f"smollm2-135m-k{k}"
        if not folder.is_dir():
            run(["surrogate", "build", TARGET, "--cut", str(k), "--out", str(folder)])
        surrogates[name] = {"cut": k, "folder": str(folder)}
    return {"trajectory": trajectory, "surrogates": surrogates}


def arms(prepared: dict) -> dict[str, dict]:
    found = {}
    for name, info in prepared["surrogates"].items():
        found[name] = {"recipe": REPO / "configs/grafting/surrogate.yaml", "folder": RUNS / f"{name}-k{info['cut']}",
                       "set": [f"model.llm.name_or_path={info['folder']}"], "cut": info["cut"]}
    found["direct"] = {"recipe": REPO / "configs/grafting/direct.yaml", "folder": RUNS / "direct", "set": [],
                       "cut": None}
    return found


# ---------------------------------------------------------------------------------------------- compute
def arm_compute(spec: dict) -> dict:
    """Per stage: kept FLOPs and process-seconds from the ledger; the caption-loss curve against cumulative FLOPs."""
    from mmtrain.cost.curve import folder_compute

    stages, curve, before = {}, [], 0.0
    for name, folder in recipe_stage_folders(spec["recipe"], spec["folder"]).items():
        compute = folder_compute(folder)
        if compute is None:
            raise SystemExit(f"{folder}: no ledger records; has it trained?")
        stages[name] = {"flops": compute.flops, "process_s": compute.gpu_s, "steps": compute.steps,
                        "val": [(p.step, p.metrics.get("val_loss")) for p in compute.points]}
        if name in CAPTION_STAGES:
            curve += [{"stage": name, "step": p.step, "flops": before + p.flops, "val_loss": p.metrics["val_loss"]}
                      for p in compute.points]
        before += compute.flops
    vision = sum(stages[name]["flops"] for name in CAPTION_STAGES if name in stages)
    return {"stages": stages, "training_flops": before, "vision_flops": vision,
            "process_s": sum(s["process_s"] for s in stages.values()), "curve": curve}


def flops_to_reach(curve: list[dict], loss: float) -> float | None:
    """FLOPs at which a curve first reaches `loss` (linear between validations); None if it never does."""
    previous = None
    for point in curve:
        if point["val_loss"] <= loss:
            if previous is None:
                return point["flops"]
            fraction = (previous["val_loss"] - loss) / (previous["val_loss"] - point["val_loss"])
            return previous["flops"] + fraction * (point["flops"] - previous["flops"])
        previous = point
    return None


# ---------------------------------------------------------------------------------------------- quality
def read_eval(folder: Path, name: str) -> dict | None:
    path = folder / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def quality(evaluation: dict | None, val: dict | None) -> dict:
    if evaluation is None:
        return {}
    loss = evaluation.get("loss", {})
    return {"val_loss": val["loss"]["loss"] if val else None, "test_loss": loss.get("loss"),
            "test_loss_other_image": loss.get("loss_other_image"),
            "cider": evaluation.get("captions", {}).get("cider"),
            "text_ppl": evaluation.get("text", {}).get("ppl")}


def report(prepared: dict, arm_specs: dict[str, dict]) -> dict:
    trajectory = prepared["trajectory"]
    traj_flops = float(trajectory.get("flops") or 0.0)
    result = {"target": TARGET, "trajectory": {k: trajectory.get(k) for k in (
        "cut", "transition_layer", "rule", "cut_curve", "kl_true_token", "kl", "texts", "positions", "flops")},
        "arms": {}}
    for name, spec in arm_specs.items():
        last = list(recipe_stage_folders(spec["recipe"], spec["folder"]).values())[-1]
        arm = {"cut": spec["cut"], **arm_compute(spec)}
        arm["total_flops"] = arm["training_flops"] + (traj_flops if name != "direct" else 0.0)
        if name == "direct":
            arm["quality"] = quality(read_eval(last, "target"), read_eval(last, "val-target"))
        else:
            arm["surrogate_pair"] = quality(read_eval(last, "surrogate"), read_eval(last, "val-surrogate"))
            arm["grafted_pair"] = quality(read_eval(last, "grafted"), read_eval(last, "val-grafted"))
            text = next(iter(recipe_stage_folders(spec["recipe"], spec["folder"]).values()))
            arm["text_stage"] = quality(read_eval(text, "text"), None).get("text_ppl")
        result["arms"][name] = arm
    direct = result["arms"]["direct"]
    for name, arm in result["arms"].items():
        if name == "direct":
            continue
        grafted = arm["grafted_pair"].get("val_loss")
        needed = flops_to_reach(direct["curve"], grafted) if grafted is not None else None
        arm["direct_flops_to_reach_grafted_val_loss"] = needed
        arm["saving_at_equal_quality"] = (1 - arm["total_flops"] / needed) if needed else None
        arm["saving_vs_direct_same_steps"] = 1 - arm["total_flops"] / direct["total_flops"]
        # The trajectory and the text stage are paid once per target and reused by every vision side
        # grafted onto it; the caption stages are what each new vision side costs.
        arm["surrogate_flops"] = arm["total_flops"] - arm["vision_flops"]
        arm["vision_saving_at_equal_quality"] = (1 - arm["vision_flops"] / needed) if needed else None
        arm["vision_saving_vs_direct_same_steps"] = 1 - arm["vision_flops"] / direct["vision_flops"]
    return result


def format_report(result: dict) -> str:
    traj = result["trajectory"]
    lines = [f"trajectory ({traj.get('cut_curve')} KL): proposed cut K={traj['cut']} (transition at layer "
             f"{traj['transition_layer']}); {traj.get('texts')} texts, {traj.get('positions')} scored positions, "
             f"{(traj.get('flops') or 0) / 1e12:.1f} TFLOPs", "",
             f"{'arm':<26} {'val loss':>9} {'test loss':>9} {'other img':>9} {'CIDEr':>6} {'text ppl':>9} "
             f"{'caption TFLOPs':>14} {'train TFLOPs':>12} {'+trajectory':>11} {'process s':>9}"]

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    def row(label, arm, q):
        return (f"{label:<26} {fmt(q.get('val_loss'), '9.3f')} {fmt(q.get('test_loss'), '9.3f')} "
                f"{fmt(q.get('test_loss_other_image'), '9.3f')} {fmt(q.get('cider'), '6.3f')} "
                f"{fmt(q.get('text_ppl'), '9.2f')} {arm['vision_flops'] / 1e12:>14.1f} {arm['training_flops'] / 1e12:>12.1f} "
                f"{arm['total_flops'] / 1e12:>11.1f} {arm['process_s']:>9.0f}")

    for name, arm in result["arms"].items():
        if name == "direct":
            lines.append(row("(c) direct on the target", arm, arm["quality"]))
        else:
            lines.append(row(f"(a) {name} pair, K={arm['cut']}", arm, arm["surrogate_pair"]))
            lines.append(row(f"(b) {name} grafted, K={arm['cut']}", arm, arm["grafted_pair"]))
    lines.append("")
    for name, arm in result["arms"].items():
        if name == "direct":
            continue
        needed = arm["direct_flops_to_reach_grafted_val_loss"]
        if arm["grafted_pair"].get("val_loss") is None:
            equal = "no grafted validation loss yet"
        elif needed is None:
            equal = "direct never reaches the grafted val loss (the grafted pair is better)"
        else:
            equal = (f"direct reaches the grafted val loss after {needed / 1e12:.1f} TFLOPs (by its first validation "
                     f"if that is the first point): grafting {'saves' if arm['saving_at_equal_quality'] >= 0 else 'costs'} "
                     f"{100 * abs(arm['saving_at_equal_quality']):.0f}% {'' if arm['saving_at_equal_quality'] >= 0 else 'more'}")
        same = arm["saving_vs_direct_same_steps"]
        lines.append(f"{name} (K={arm['cut']}; surrogate after its text stage: text ppl {fmt(arm['text_stage'], '.2f')}): "
                     f"{equal}; its total compute (trajectory and text stage included) is {100 * abs(same):.0f}% "
                     f"{'less' if same >= 0 else 'more'} than direct's")
        vision_same = arm["vision_saving_vs_direct_same_steps"]
        vision_equal = arm["vision_saving_at_equal_quality"]
        lines.append(f"  with the surrogate already built ({arm['surrogate_flops'] / 1e12:.1f} TFLOPs, paid once per target): "
                     f"its caption stages cost {100 * abs(vision_same):.0f}% {'less' if vision_same >= 0 else 'more'} "
                     f"than direct's" + ("" if vision_equal is None else
                                         f"; {100 * abs(vision_equal):.0f}% {'saved' if vision_equal >= 0 else 'more'} "
                                         "at equal quality"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--early-cut", type=int, default=None, help="the ablation's cut (default: half the proposed)")
    parser.add_argument("--arms", default="surrogate,direct,early-cut", help="which arms to run (report: all that ran)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run(["assets", "prepare", *ASSETS])
    prepared = prepare(args.early_cut)
    arm_specs = arms(prepared)
    if not args.report_only:
        for name in [a.strip() for a in args.arms.split(",") if a.strip()]:
            spec = arm_specs[name]
            sets = [x for s in spec["set"] for x in ("--set", s)]
            run(["run", str(spec["recipe"]), "--output-dir", str(spec["folder"]), *sets])
    ran = {n: s for n, s in arm_specs.items() if (s["folder"] / "ledger.jsonl").is_file()}
    if "direct" not in ran:
        print("the direct arm has not run yet", file=sys.stderr)
        return 1
    result = report(prepared, ran)
    result["command"] = "python benchmarks/bench_grafting.py" + (f" --early-cut {args.early_cut}" if args.early_cut else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in ("trajectory.json", "trajectory.png"):
        source = RUNS / "trajectory" / name
        if source.is_file():
            shutil.copyfile(source, RESULTS / f"grafting_{name}")
    from mmtrain.utils.io import atomic_write_json

    atomic_write_json(RESULTS / "grafting.json", result)
    print(format_report(result))
    print(f"\nresults: {RESULTS / 'grafting.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
