"""VPGTrans against training from scratch run to its plateau, on real transfer pairs (configs/vpgtrans/pairs/).

The speed-up is defined against training from scratch's (TFS) best validation loss, so TFS must
reach its best: TFS runs one epoch at a time (`stop_after_steps`, the schedule spanning the
recipe's `max_steps`), validated every quarter epoch, until the PLATEAU RULE fires: none of the
validations of the last 2 epochs improved the best validation loss before them by more than 0.5%.
The transfer arms run a quarter epoch at a time and stop at the first validation that reaches TFS's
best (all the speed-up needs). Then each arm's test evaluation runs.
Arms (recipes of the pair's folder): tfs; vpgtrans (converter + merge -> 1-epoch projector warm-up
at 5x -> fine-tune); no-converter; no-warmup; converter-text (converter fitted on much more text);
converter-norm (converter scaled to the target's embedding norm; smollm2-to-qwen0.5b only).
The source VPG runs first: smollm2-to-qwen0.5b's source.yaml for a fixed number of epochs;
qwen0.5b-to-1.5b's source is smollm2-to-qwen0.5b's TFS arm, run to its plateau.

    python benchmarks/bench_vpgtrans_pairs.py --pair smollm2-to-qwen0.5b             # resumable
    python benchmarks/bench_vpgtrans_pairs.py --pair qwen0.5b-to-1.5b                 # same tokenizer
    python benchmarks/bench_vpgtrans_pairs.py --pair smollm2-to-qwen0.5b --arms tfs --max-epochs 2
    python benchmarks/bench_vpgtrans_pairs.py --pair smollm2-to-qwen0.5b --report-only

Compute comes from the runs' ledgers (training FLOPs, `mmtrain.cost.curve`) and from their metrics
(processes x wall seconds; CPU seconds), validation excluded. Writes
benchmarks/results/vpgtrans_<pair>.json and vpgtrans_<pair>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, recipe_stage_folders  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Pair:
    models: tuple[str, ...]
    """The model assets the pair needs."""
    source: str
    """The recipe (under configs/vpgtrans/pairs/) whose last stage is the source VPG."""
    source_to_plateau: bool = False
    """The source recipe is a TFS arm: run it to its plateau (else it runs its fixed schedule)."""


PAIRS_DIR = REPO / "configs" / "vpgtrans" / "pairs"
PAIRS = {
    "smollm2-to-qwen0.5b": Pair(("smollm2-135m", "qwen2.5-coder-0.5b"), "smollm2-to-qwen0.5b/source.yaml"),
    "qwen0.5b-to-1.5b": Pair(("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"), "smollm2-to-qwen0.5b/tfs.yaml",
                             source_to_plateau=True),
}
ARMS = ("tfs", "vpgtrans", "no-converter", "no-warmup", "converter-text", "converter-norm")
ASSETS = ["captions-mix", "dinov2-small", "debian-text"]
STEPS_PER_EPOCH = 160
"""base.yaml: 2560 training images in steps of 16."""
VALIDATIONS_PER_EPOCH = 4
"""base.yaml: eval_every 40, so the speed-up resolves a quarter of an epoch."""
PATIENCE_EPOCHS = 2
MIN_IMPROVEMENT = 0.005
TEST = ["--data", "asset:captions-mix/test.jsonl", "--max-samples", "128", "--max-new-tokens", "16", "--show", "4"]
EXIT_STOPPED = 3


def recipe(pair: str, arm: str) -> Path:
    return PAIRS_DIR / pair / f"{arm}.yaml"


def source_recipe(pair: str) -> Path:
    return PAIRS_DIR / PAIRS[pair].source


def output_dir(path: Path) -> Path:
    import yaml

    return REPO / yaml.safe_load(path.read_text())["output_dir"]


def last_stage(path: Path) -> Path:
    return list(recipe_stage_folders(path, output_dir(path)).values())[-1]


def val_records(stage: Path) -> list[dict]:
    metrics = stage / "metrics.jsonl"
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if "val_loss" in r]


def val_losses(stage: Path) -> list[float]:
    return [r["val_loss"] for r in val_records(stage)]


def mmtrain(args: list[str]) -> int:
    print("==> mmtrain " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}).returncode


def run_to_plateau(path: Path, max_epochs: int, target: float | None = None) -> None:
    """Run the recipe's stages in order, a piece at a time, until the plateau rule fires on the
    arm's validation curve (every stage on the target), `max_epochs` epochs ran, or (transfer arms)
    a validation loss reached `target`, TFS's best: the speed-up needs no more. TFS runs whole
    epochs; transfer arms run one validation interval at a time, so they stop right at the target."""
    from mmtrain.methods.vpgtrans.speedup import plateaued
    from mmtrain.pipeline.recipe import load_recipe
    from mmtrain.pipeline.state import probe

    chunk = STEPS_PER_EPOCH if target is None else STEPS_PER_EPOCH // VALIDATIONS_PER_EPOCH
    while True:
        stages = load_recipe(path, output_dir=output_dir(path)).stages
        curve = [v for stage in stages for v in val_losses(stage.folder)]
        if target is not None and curve and min(curve) <= target:
            print(f"{path.stem}: reached TFS's best {target:.4f} at validation {len(curve)}", flush=True)
            return
        if plateaued(curve, PATIENCE_EPOCHS * VALIDATIONS_PER_EPOCH, MIN_IMPROVEMENT):
            print(f"{path.stem}: plateau after {len(curve)} validations (best {min(curve):.4f})", flush=True)
            return
        if len(curve) >= max_epochs * VALIDATIONS_PER_EPOCH:
            print(f"{path.stem}: {max_epochs} epochs (the limit) without a plateau", flush=True)
            return
        stage = next((s for s in stages if not probe(s).done), None)
        if stage is None:
            print(f"{path.stem}: every stage ran to its max_steps without a plateau", flush=True)
            return
        steps = max((r["step"] for r in val_records(stage.folder)), default=0)
        code = mmtrain(["run", str(path), "--stage", stage.name, "--set", f"stop_after_steps={steps + chunk}"])
        if code not in (0, EXIT_STOPPED):
            raise SystemExit(f"{path} failed ({code}); see its logs")
        if max((r["step"] for r in val_records(stage.folder)), default=0) <= steps:
            raise SystemExit(f"{path}: no new validation after a run; see {stage.folder / 'logs'}")


def test_eval(path: Path) -> None:
    stage = last_stage(path)
    out = stage / "eval" / "test.json"
    if not out.is_file() and mmtrain(["eval", str(stage), *TEST, "--out", str(out)]) != 0:
        raise SystemExit(f"the test evaluation of {stage} failed")


def source_compute(pair: str) -> dict:
    """The source VPG's training: process-seconds (wall, CPU) and FLOPs from its ledger."""
    from mmtrain.cost.curve import folder_compute
    from mmtrain.methods.vpgtrans.speedup import stage_compute, stage_records

    stage = last_stage(source_recipe(pair))
    records = stage_records(stage)
    compute = folder_compute(stage)
    return {"wall_s": stage_compute(records), "cpu_s": stage_compute(records, "cpu_s"),
            "flops": compute.flops if compute else None, "stage": str(stage.relative_to(REPO))}


def arm_report(pair: str, arm: str, source: dict) -> dict | None:
    from mmtrain.cost.curve import folder_compute
    from mmtrain.methods.vpgtrans.speedup import SpeedupError, read_curve, speedup_report

    folder, tfs = output_dir(recipe(pair, arm)), output_dir(recipe(pair, "tfs"))
    try:
        if arm == "tfs":
            return {"curve": dataclasses.asdict(read_curve(folder, folder_compute))}
        report = speedup_report(folder, tfs, ["val_loss"], compute_of=folder_compute)
    except (SpeedupError, FileNotFoundError, StopIteration) as exc:
        print(f"{arm}: no report yet ({exc})", file=sys.stderr)
        return None
    (s,) = report["speedups"]
    report["source_vpg"] = source
    reached = s["vt_epoch"] is not None

    def with_source(tfs_value, vt_value, extra):
        return tfs_value / (vt_value + extra) if reached and None not in (tfs_value, vt_value, extra) else None

    s["speedup_compute_with_source"] = with_source(s["tfs_compute_s"], s["vt_compute_s"], source["wall_s"])
    s["speedup_cpu_with_source"] = with_source(s["tfs_cpu_s"], s["vt_cpu_s"], source["cpu_s"])
    s["speedup_flops_with_source"] = with_source(s["tfs_flops"], s["vt_flops"], source["flops"])
    return report


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(reports: dict[str, dict]) -> str:
    header = (f"{'arm':<15} {'vals':>6} {'best val':>8} {'reaches TFS best':>16} {'epochs x':>8} {'FLOPs x':>7} "
              f"{'+src':>6} {'wall x':>6} {'+src':>6} {'cpu x':>6} {'PFLOPs':>7} {'test loss':>9} {'other img':>9} "
              f"{'CIDEr':>6}")
    lines = [header, "-" * len(header)]
    for arm, report in reports.items():
        curve = report["curve"] if arm == "tfs" else report["vpgtrans"]
        values = [p["metrics"]["val_loss"] for p in curve["points"]]
        test = curve["final_evals"].get("test", {})
        last = curve["points"][-1]
        if arm == "tfs":
            best = min(values)
            cells = [f"epoch {curve['points'][values.index(best)]['epoch']:.2f} (own)", "1.00x", "1.00x", "-", "1.00x", "-", "1.00x"]
        else:
            (s,) = report["speedups"]
            best = s["vt_best"]
            cells = ["never" if s["vt_epoch"] is None else f"epoch {s['vt_epoch']:.2f}", _times(s["speedup_epochs"]),
                     _times(s["speedup_flops"]), _times(s["speedup_flops_with_source"]),
                     _times(s["speedup_compute"]), _times(s["speedup_compute_with_source"]), _times(s["speedup_cpu"])]
        flops = "-" if last.get("flops") is None else f"{last['flops'] / 1e15:.2f}"
        lines.append(f"{arm:<15} {len(values):>6} {best:>8.4f} {cells[0]:>16} {cells[1]:>8} {cells[2]:>7} "
                     f"{cells[3]:>6} {cells[4]:>6} {cells[5]:>6} {cells[6]:>6} {flops:>7} "
                     f"{test.get('loss', float('nan')):>9.4f} {test.get('loss_other_image', float('nan')):>9.4f} "
                     f"{test.get('cider', float('nan')):>6.3f}")
    lines.append("epochs x / FLOPs x / wall x / cpu x: TFS's cost to its best over the arm's cost to reach it; +src adds "
                 "the source VPG's training; PFLOPs: the arm's training FLOPs to its last epoch (source excluded)")
    return "\n".join(lines)


def plot(reports: dict[str, dict], pair: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_flops, by_epoch) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, report in reports.items():
        curve = report["curve"] if arm == "tfs" else report["vpgtrans"]
        ys = [p["metrics"]["val_loss"] for p in curve["points"]]
        if all(p.get("flops") is not None for p in curve["points"]):
            by_flops.plot([p["flops"] / 1e15 for p in curve["points"]], ys, marker="o", label=arm)
        by_epoch.plot([p["epoch"] for p in curve["points"]], ys, marker="o", label=arm)
    by_flops.set_xlabel("training PFLOPs on the target (source VPG excluded)")
    by_epoch.set_xlabel("epochs on the target (VPGTrans: the warm-up is epoch 1)")
    for axis in (by_flops, by_epoch):
        axis.set_ylabel("validation loss (nats/token)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"VPGTrans vs training from scratch: {pair}, captions-mix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), required=True)
    parser.add_argument("--arms", help="comma-separated subset of " + ", ".join(ARMS) + " (default: every arm the "
                        "pair has a recipe for)")
    parser.add_argument("--max-epochs", type=int, default=30, help="stop an arm here even without a plateau")
    parser.add_argument("--report-only", action="store_true", help="do not train; report on what has run")
    args = parser.parse_args()
    available = [a for a in ARMS if recipe(args.pair, a).is_file()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else available
    if unknown := [a for a in arms if a not in available]:
        parser.error(f"no recipe for arm(s) {', '.join(unknown)} of {args.pair}; choose from {', '.join(available)}")
    if not args.report_only:
        pair = PAIRS[args.pair]
        if mmtrain(["assets", "prepare", *ASSETS, *pair.models]) != 0:
            return 1
        if pair.source_to_plateau:
            run_to_plateau(source_recipe(args.pair), args.max_epochs)
        elif mmtrain(["run", str(source_recipe(args.pair))]) != 0:
            return 1
        run_to_plateau(recipe(args.pair, "tfs"), args.max_epochs)
        test_eval(recipe(args.pair, "tfs"))
        tfs_best = min(val_losses(last_stage(recipe(args.pair, "tfs"))))
        for arm in [a for a in arms if a != "tfs"]:
            run_to_plateau(recipe(args.pair, arm), args.max_epochs, target=tfs_best)
            test_eval(recipe(args.pair, arm))
    source = source_compute(args.pair)
    reports = {arm: r for arm in ["tfs", *[a for a in arms if a != "tfs"]] if (r := arm_report(args.pair, arm, source))}
    if "tfs" not in reports:
        print("no TFS curve yet: run the tfs arm first", file=sys.stderr)
        return 1
    print(table(reports))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"pair": args.pair, "rule": {"patience_epochs": PATIENCE_EPOCHS, "min_improvement": MIN_IMPROVEMENT,
                                          "steps_per_epoch": STEPS_PER_EPOCH,
                                          "validations_per_epoch": VALIDATIONS_PER_EPOCH}, "source_vpg": source, "arms": reports}
    (RESULTS / f"vpgtrans_{args.pair}.json").write_text(json.dumps(result, indent=1))
    plot(reports, args.pair, RESULTS / f"vpgtrans_{args.pair}.png")
    print(f"results: {RESULTS / f'vpgtrans_{args.pair}.json'}, plot: {RESULTS / f'vpgtrans_{args.pair}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
