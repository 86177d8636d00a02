"""Zero-shot grafting via an LLM surrogate, in miniature, on real weights: the method's headline on a CPU.

Target SmolLM2-135M (30 layers), frozen pretrained MobileNetV2, per-token MLP + 2-layer GELU adapter
with begin/end-of-image embeddings, real Tux Paint captions mixed with real text-only instructions
(configs/grafting/). Steps:
  1. `mmtrain surrogate trajectory` on 300 prose sentences: KL per layer, the proposed cut K;
  2. `mmtrain surrogate build` for K and for an early cut (before the transition point);
  3. arms, each two stages (stage 1, 160 steps: adapter + boundaries (+ translator) on image-text
     + text-only; stage 2, 64 steps: adapter + top 3 MobileNetV2 blocks on the captions):
       - surrogate:   configs/grafting/surrogate.yaml on the K surrogate, evaluated as the surrogate
                      pair and GRAFTED onto the full target (no training);
       - early-cut:   the same on the early-cut surrogate;
       - direct:      configs/grafting/direct.yaml, the same stages against the full target;
  4. quality (validation and test caption loss, test loss with another image's pixels, CIDEr-D,
     text-only perplexity on held-out prose) and compute for each arm, and the cost at equal quality.

    python benchmarks/bench_grafting.py                 # run what is missing, then report
    python benchmarks/bench_grafting.py --report-only

Compute is counted in FLOPs (all training stages, and the trajectory's forward passes), converted to
GPU-hour equivalents at an assumed throughput; measured CPU seconds are reported next to them.
Writes benchmarks/results/grafting.json (+ the trajectory JSON/PNG next to it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import run_mmtrain as run  # noqa: E402
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "grafting"
ASSETS = ["tuxpaint", "mobilenetv2", "smollm2-135m", "prose"]
PEAK_FLOPS = 989e12
"""H100 SXM dense bf16 peak, FLOP/s."""
ASSUMED_MFU = 0.40
FROZEN_AFTER_TRAINABLE = 2
"""A frozen module behind a trainable one: forward + the backward for its input gradients."""
TRAINABLE = 3
"""Forward + input-gradient backward + weight-gradient backward."""


def prepare(target: str, early_cut: int | None) -> dict:
    """Trajectory, the cuts and the two surrogates (each step skipped when its output exists)."""
    trajectory_dir = RUNS / "trajectory"
    if not (trajectory_dir / "trajectory.json").is_file():
        run(["surrogate", "trajectory", target, "--texts", "asset:prose/train.txt", "--num-texts", "300",
             "--out", str(trajectory_dir)])
    trajectory = json.loads((trajectory_dir / "trajectory.json").read_text())
    cut = int(trajectory["cut"])
    early = early_cut if early_cut is not None else max(1, cut // 2)
    surrogates = {}
    for name, k in (("surrogate", cut), ("early-cut", early)):
        folder = RUNS / "surrogates" / f"smollm2-135m-k{k}"
        if not folder.is_dir():
            run(["surrogate", "build", target, "--cut", str(k), "--out", str(folder)])
        surrogates[name] = {"cut": k, "folder": str(folder)}
    return {"trajectory": trajectory, "surrogates": surrogates}


def arms(prepared: dict) -> dict[str, dict]:
    found = {}
    for name, info in prepared["surrogates"].items():
        found[name] = {"recipe": "configs/grafting/surrogate.yaml", "folder": RUNS / f"{name}-k{info['cut']}",
                       "set": [f"model.llm.name_or_path={info['folder']}"], "cut": info["cut"]}
    found["direct"] = {"recipe": "configs/grafting/direct.yaml", "folder": RUNS / "direct", "set": [], "cut": None}
    return found


# ---------------------------------------------------------------------------------------------- compute
def llm_parameters(folder: str) -> dict[str, int]:
    """Element counts of a checkpoint's decoder layers, head and embeddings, read from the safetensors headers."""
    from mmtrain.methods.grafting.build import checkpoint_tensors

    config = json.loads((Path(folder) / "config.json").read_text())
    counts = {"layers": 0, "head": 0, "embed": 0, "norm": 0}
    per_layer: dict[int, int] = {}
    for name, entry in checkpoint_tensors(folder).items():
        numel = 1
        for size in entry.shape:
            numel *= size
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            per_layer[index] = per_layer.get(index, 0) + numel
        elif name.startswith("lm_head"):
            counts["head"] += numel
        elif "embed_tokens" in name:
            counts["embed"] += numel
        else:
            counts["norm"] += numel
    if config.get("tie_word_embeddings") and not counts["head"]:
        counts["head"] = counts["embed"]
    counts["layers"] = sum(per_layer.values())
    counts["per_layer"] = per_layer
    counts["translator"] = per_layer.get(int(config.get("mmtrain_surrogate", {}).get("translator_layer", -1)), 0)
    return counts


def vision_forward_flops(stage: Path) -> dict[str, float]:
    """Forward FLOPs per image of the tower and of resampler + projector, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmtrain.config import load_config
    from mmtrain.models import build_vlm

    cfg = load_config(stage / "config.yaml")
    model, _, _ = build_vlm(cfg.model)
    pixels = torch.zeros(1, *model.vision.image_shape)
    with torch.no_grad():
        with FlopCounterMode(display=False) as tower:
            features = model.vision(pixels)
        with FlopCounterMode(display=False) as adapter:
            model.projector(model.resampler(features))
    return {"tower": float(tower.get_total_flops()), "adapter": float(adapter.get_total_flops())}


def stage_flops(stage: Path, llm: dict[str, int], vision: dict[str, float]) -> dict[str, float]:
    """Training FLOPs of one stage from its token and sample counts (see the module docstring)."""
    import yaml

    config = yaml.safe_load((stage / "config.yaml").read_text())
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "tokens" in r][-1]
    tokens, samples = int(last["tokens"]), int(last["samples"])
    manifests = config["data"]["train"] if isinstance(config["data"]["train"], list) else [config["data"]["train"]]
    counts = [sum(1 for line in Path(m).read_text().splitlines() if line.strip()) for m in manifests]
    with_image = sum(c for m, c in zip(manifests, counts) if "prose" not in m)
    images = samples * with_image / sum(counts)
    translator = llm["translator"] if config["model"]["llm"]["trainable"] == "adapters" else 0
    frozen = llm["layers"] + llm["norm"] + llm["head"] - translator
    llm_flops = tokens * 2 * (FROZEN_AFTER_TRAINABLE * frozen + TRAINABLE * translator)
    vision_flops = images * (vision["tower"] + TRAINABLE * vision["adapter"])
    return {"tokens": tokens, "samples": samples, "images": images, "llm": llm_flops, "vision": vision_flops,
            "total": llm_flops + vision_flops}


def trajectory_flops(trajectory: dict, target: dict[str, int]) -> float:
    """Forward of the target over the trajectory's tokens, plus the logit lens at every layer."""
    tokens = int(trajectory["positions"]) + int(trajectory["texts"])  # scored positions + each text's last token
    layers = len(target["per_layer"])
    return tokens * 2 * (target["layers"] + target["norm"] + target["head"] * (1 + layers))


def gpu_hours(flops: float) -> float:
    return flops / (PEAK_FLOPS * ASSUMED_MFU) / 3600


# ---------------------------------------------------------------------------------------------- report
def read_eval(folder: Path, name: str) -> dict | None:
    path = folder / "02-stage2" / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def quality(evaluation: dict | None, val: dict | None) -> dict:
    if evaluation is None:
        return {}
    loss = evaluation.get("loss", {})
    return {"val_loss": val["loss"]["loss"] if val else None, "test_loss": loss.get("loss"),
            "test_loss_other_image": loss.get("loss_other_image"),
            "cider": evaluation.get("captions", {}).get("cider"),
            "text_ppl": evaluation.get("text", {}).get("ppl")}


def validation_curve(folder: Path, flops_per_stage: list[dict]) -> list[dict]:
    """(cumulative FLOPs, validation loss) after every validation of both stages."""
    points, before = [], 0.0
    for stage, flops in zip(("01-stage1", "02-stage2"), flops_per_stage):
        records = [json.loads(line) for line in (folder / stage / "metrics.jsonl").read_text().splitlines() if line]
        tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
        for r in (r for r in records if "val_loss" in r):
            share = tokens_at.get(r["step"], flops["tokens"]) / max(flops["tokens"], 1)
            points.append({"stage": stage, "step": r["step"], "flops": before + share * flops["total"],
                           "val_loss": r["val_loss"]})
        before += flops["total"]
    return points


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


def cpu_seconds(folder: Path) -> float:
    total = 0.0
    for stage in ("01-stage1", "02-stage2"):
        records = [json.loads(line) for line in (folder / stage / "metrics.jsonl").read_text().splitlines() if line]
        total += max((r.get("cpu_s", 0.0) for r in records), default=0.0)
    return total


def report(prepared: dict, arm_specs: dict[str, dict], target: str) -> dict:
    from mmtrain.assets.registry import resolve_asset_reference

    target_dir = resolve_asset_reference(target)
    target_params = llm_parameters(target_dir)
    trajectory = prepared["trajectory"]
    traj_flops = trajectory_flops(trajectory, target_params)
    vision = vision_forward_flops(arm_specs["direct"]["folder"] / "01-stage1")
    result = {"target": target_dir, "trajectory": {k: trajectory.get(k) for k in
                                                   ("cut", "transition_layer", "rule", "kl", "texts", "positions")},
              "trajectory_flops": traj_flops, "assumed": {"peak_flops": PEAK_FLOPS, "mfu": ASSUMED_MFU},
              "vision_forward_flops_per_image": vision, "arms": {}}
    direct_curve = None
    for name, spec in arm_specs.items():
        folder = spec["folder"]
        llm_dir = target_dir if name == "direct" else prepared["surrogates"][name]["folder"]
        params = llm_parameters(llm_dir)
        flops = [stage_flops(folder / s, params, vision) for s in ("01-stage1", "02-stage2")]
        training = sum(f["total"] for f in flops)
        total = training + (traj_flops if name != "direct" else 0.0)
        arm = {"cut": spec["cut"], "llm": llm_dir, "llm_layers": len(params["per_layer"]),
               "llm_parameters": params["layers"] + params["norm"] + params["embed"]
               + (0 if params["head"] == params["embed"] else params["head"]),
               "stage_flops": flops, "training_flops": training, "total_flops": total,
               "gpu_hours": gpu_hours(total), "cpu_seconds": cpu_seconds(folder),
               "curve": validation_curve(folder, flops)}
        if name == "direct":
            arm["quality"] = quality(read_eval(folder, "target"), None)
            arm["quality"]["val_loss"] = arm["curve"][-1]["val_loss"]
            direct_curve = arm["curve"]
        else:
            arm["surrogate_pair"] = quality(read_eval(folder, "surrogate"), read_eval(folder, "val-surrogate"))
            arm["grafted_pair"] = quality(read_eval(folder, "grafted"), read_eval(folder, "val-grafted"))
        result["arms"][name] = arm
    direct_total = result["arms"]["direct"]["total_flops"]
    for name, arm in result["arms"].items():
        if name == "direct":
            continue
        grafted = arm["grafted_pair"].get("val_loss")
        needed = flops_to_reach(direct_curve, grafted) if grafted is not None else None
        arm["direct_flops_to_reach_grafted_val_loss"] = needed
        arm["saving_at_equal_quality"] = (1 - arm["total_flops"] / needed) if needed else None
        arm["saving_vs_direct_same_steps"] = 1 - arm["total_flops"] / direct_total
    return result


def format_report(result: dict) -> str:
    traj = result["trajectory"]
    direct_training = result["arms"]["direct"]["training_flops"]
    direct_curve_start = result["arms"]["direct"]["curve"][0]["flops"]
    lines = [f"trajectory: proposed cut K={traj['cut']} (transition at layer {traj['transition_layer']}); "
             f"{traj.get('texts')} texts, {traj.get('positions')} scored positions",
             "",
             f"{'arm':<26} {'LLM layers':>10} {'val loss':>9} {'test loss':>9} {'other img':>9} {'CIDEr':>6} "
             f"{'text ppl':>9} {'train TFLOPs':>12} {'+trajectory':>11} {'GPU-h eq.':>10} {'CPU s':>7}"]

    def row(label, arm, q):
        def fmt(value, spec):
            return format(value, spec) if isinstance(value, (int, float)) else "-"
        return (f"{label:<26} {arm['llm_layers']:>10} {fmt(q.get('val_loss'), '9.3f')} {fmt(q.get('test_loss'), '9.3f')} "
                f"{fmt(q.get('test_loss_other_image'), '9.3f')} {fmt(q.get('cider'), '6.3f')} "
                f"{fmt(q.get('text_ppl'), '9.2f')} {arm['training_flops'] / 1e12:>12.1f} {arm['total_flops'] / 1e12:>11.1f} "
                f"{arm['gpu_hours']:>10.2e} "
                f"{arm['cpu_seconds']:>7.0f}")

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
        equal = (f"direct needs {needed / 1e12:.1f} TFLOPs to reach the grafted val loss: saving "
                 f"{100 * arm['saving_at_equal_quality']:.0f}%" + (" (direct is already better at its first validation)"
                                                           if needed == direct_curve_start else "")) if needed else \
            "direct never reaches the grafted val loss within its run (no equal-quality point)"
        same = arm["saving_vs_direct_same_steps"]
        lines.append(f"{name} (K={arm['cut']}): {equal}; compute of the same steps, trajectory included: "
                     f"{100 * abs(same):.0f}% {'less' if same >= 0 else 'more'} than direct (training alone: "
                     f"{100 * (1 - arm['training_flops'] / direct_training):.0f}% less)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="asset:smollm2-135m")
    parser.add_argument("--early-cut", type=int, default=None, help="the ablation's cut (default: half the proposed)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="delete runs/grafting first")
    args = parser.parse_args()
    if args.fresh and RUNS.exists():
        shutil.rmtree(RUNS)
    if not args.report_only:
        run(["assets", "prepare", *ASSETS])
    prepared = prepare(args.target, args.early_cut)
    arm_specs = arms(prepared)
    if not args.report_only:
        for spec in arm_specs.values():
            sets = [x for s in spec["set"] for x in ("--set", s)]
            run(["run", spec["recipe"], "--output-dir", str(spec["folder"]), *sets])
    result = report(prepared, arm_specs, args.target)
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
