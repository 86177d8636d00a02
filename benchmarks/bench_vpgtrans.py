"""VPGTrans vs training from scratch, in miniature, on real weights: the method's headline on a CPU.

Source Qwen2.5-Coder-0.5B -> target Qwen2.5-Coder-1.5B (same tokenizer), frozen pretrained
MobileNetV2, MLP resampler + linear projector, real Tux Paint captions (configs/vpgtrans/). Arms,
each validated on the same 40 held-out images after every epoch (an epoch = a fixed seeded subset
of 128 training images, 16 steps of 8), all on the 1.5B target for 4 epochs:
  - tfs:          training the VPG from scratch (configs/vpgtrans/tfs.yaml)
  - vpgtrans:     source VPG (5 epochs on the 0.5B) -> word converter + merge -> 1-epoch projector
                  warm-up at 5x LR -> 3 epochs joint fine-tune (configs/vpgtrans/vpgtrans.yaml)
  - no-warmup:    converter init, no warm-up: 4 epochs joint fine-tune (configs/vpgtrans/no-warmup.yaml)
  - no-converter: inherited resampler, projector from scratch, warm-up + fine-tune (no-converter.yaml)
Each arm is a `mmtrain run` of its recipe (a rerun skips finished stages), then
`mmtrain transfer speedup ARM tfs` gives the paper's speed-up in epochs and in compute.

    python benchmarks/bench_vpgtrans.py                 # run what is missing, then report
    python benchmarks/bench_vpgtrans.py --report-only   # report on what has run
    python benchmarks/bench_vpgtrans.py --arms tfs,vpgtrans

Writes benchmarks/results/vpgtrans.json and benchmarks/results/vpgtrans_curves.png (validation
loss against compute and against epochs for every arm).
Compute is processes x wall seconds of training (model loading, converter fitting, checkpoints
included; validation excluded), i.e. GPU-hours on a GPU, CPU process-hours here.
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
RESULTS = REPO / "benchmarks" / "results"
ARMS = {  # arm -> (recipe, run folder)
    "tfs": ("configs/vpgtrans/tfs.yaml", "runs/vpgtrans/tfs"),
    "vpgtrans": ("configs/vpgtrans/vpgtrans.yaml", "runs/vpgtrans/vpgtrans"),
    "no-warmup": ("configs/vpgtrans/no-warmup.yaml", "runs/vpgtrans/no-warmup"),
    "no-converter": ("configs/vpgtrans/no-converter.yaml", "runs/vpgtrans/no-converter"),
}
ASSETS = ["tuxpaint", "mobilenetv2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def run_arm(name: str) -> int:
    recipe, _ = ARMS[name]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"==> {name}: mmtrain run {recipe}", flush=True)
    return subprocess.run([sys.executable, "-m", "mmtrain", "run", recipe], cwd=REPO, env=env).returncode


def arm_report(name: str) -> dict | None:
    from mmtrain.methods.vpgtrans.speedup import SpeedupError, read_curve, speedup_report

    folder = REPO / ARMS[name][1]
    try:
        if name == "tfs":
            return {"curve": dataclasses.asdict(read_curve(folder))}
        report = speedup_report(folder, REPO / ARMS["tfs"][1], ["val_loss"])
        with_source(report)
        return report
    except (SpeedupError, FileNotFoundError, StopIteration) as exc:
        print(f"{name}: no report yet ({exc})", file=sys.stderr)
        return None


def source_compute() -> tuple[float | None, float | None, str]:
    """(wall, cpu) process-seconds of training the source VPG: the re-measured copy of the vpgtrans
    recipe's source stage (`runs/vpgtrans/source-check`, run on a quiet machine) if present, else
    that stage itself."""
    from mmtrain.methods.vpgtrans.speedup import stage_compute, stage_records

    for folder in (REPO / "runs/vpgtrans/source-check/01-source", REPO / ARMS["vpgtrans"][1] / "01-source"):
        if (folder / "stage.json").is_file():
            records = stage_records(folder)
            return stage_compute(records), stage_compute(records, "cpu_s"), str(folder.relative_to(REPO))
    return None, None, "none"


def with_source(report: dict) -> None:
    """Recompute the '+source' ratios of an arm with the one source-VPG measurement shared by all arms."""
    wall, cpu, where = source_compute()
    (s,) = report["speedups"]
    report["source_vpg"] = {"wall_s": wall, "cpu_s": cpu, "from": where}
    ok = s["vt_epoch"] is not None
    s["speedup_compute_with_source"] = (s["tfs_compute_s"] / (s["vt_compute_s"] + wall)
                                        if ok and wall is not None else None)
    s["speedup_cpu_with_source"] = (s["tfs_cpu_s"] / (s["vt_cpu_s"] + cpu)
                                    if ok and cpu is not None and s["tfs_cpu_s"] and s["vt_cpu_s"] else None)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(reports: dict[str, dict]) -> str:
    header = (f"{'arm':<13} {'best val':>8} {'final val':>9} {'reaches TFS best':>16} {'speed-up':>8} "
              f"{'wall':>6} {'+src':>6} {'cpu':>6} {'+src':>6} {'wall h':>7} {'cpu h':>6} {'test loss':>9} "
              f"{'no-img':>7} {'CIDEr':>6}")
    lines = [header, "-" * len(header)]
    for name, report in reports.items():
        curve = report["curve"] if name == "tfs" else report["vpgtrans"]
        values = [p["metrics"]["val_loss"] for p in curve["points"]]
        last = curve["points"][-1]
        test = curve["final_evals"].get("test", {})
        if name == "tfs":
            best = min(values)
            epoch = next(p["epoch"] for p in curve["points"] if p["metrics"]["val_loss"] == best)
            ratios = [f"epoch {epoch:.0f} (own)", "1.00x", "1.00x", "-", "1.00x", "-"]
        else:
            (s,) = report["speedups"]
            best = s["vt_best"]
            ratios = ["never" if s["vt_epoch"] is None else f"epoch {s['vt_epoch']:.0f}", _times(s["speedup_epochs"]),
                      _times(s["speedup_compute"]), _times(s["speedup_compute_with_source"]), _times(s["speedup_cpu"]),
                      _times(s["speedup_cpu_with_source"])]
        cpu_h = "-" if last.get("cpu_s") is None else f"{last['cpu_s'] / 3600:.3f}"
        lines.append(f"{name:<13} {best:>8.4f} {values[-1]:>9.4f} {ratios[0]:>16} {ratios[1]:>8} {ratios[2]:>6} "
                     f"{ratios[3]:>6} {ratios[4]:>6} {ratios[5]:>6} {last['compute_s'] / 3600:>7.3f} {cpu_h:>6} "
                     f"{test.get('loss', float('nan')):>9.4f} {test.get('loss_no_image', float('nan')):>7.3f} "
                     f"{test.get('cider', float('nan')):>6.3f}")
    lines.append("speed-up: epochs; wall / cpu: compute (processes x wall seconds, CPU seconds); +src: with the "
                 "source VPG's training; wall h / cpu h: the arm's compute to its last epoch, source excluded")
    return "\n".join(lines)


def plot(reports: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (make setup installs it): no plot", file=sys.stderr)
        return False
    fig, (by_compute, by_epoch) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, report in reports.items():
        curve = report["curve"] if name == "tfs" else report["vpgtrans"]
        prior = (source_compute()[0] or 0.0) if name == "vpgtrans" else 0.0
        xs = [p["compute_s"] / 3600 for p in curve["points"]]
        ys = [p["metrics"]["val_loss"] for p in curve["points"]]
        by_compute.plot(xs, ys, marker="o", label=name)
        if prior:
            by_compute.plot([(prior + p["compute_s"]) / 3600 for p in curve["points"]], ys, linestyle=":",
                            color=by_compute.lines[-1].get_color(), label=f"{name} + source VPG")
        by_epoch.plot([p["epoch"] for p in curve["points"]], ys, marker="o", label=name)
    by_compute.set_xlabel("compute (CPU process-hours; GPU-hours on GPUs)")
    by_epoch.set_xlabel("epochs on the 1.5B target (VPGTrans: warm-up = epoch 1)")
    for axis in (by_compute, by_epoch):
        axis.set_ylabel("validation loss (nats/token)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("VPGTrans vs training from scratch: Qwen2.5-Coder-0.5B -> 1.5B, Tux Paint captions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--report-only", action="store_true", help="do not train; report on what has run")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if not args.report_only:
        prepared = subprocess.run([sys.executable, "-m", "mmtrain", "assets", "prepare", *ASSETS], cwd=REPO)
        if prepared.returncode != 0:
            return prepared.returncode
        for name in arms:
            if run_arm(name) != 0:
                print(f"arm {name} failed; see its run folder {ARMS[name][1]}", file=sys.stderr)
                return 1
    reports = {name: r for name in ["tfs", *[a for a in arms if a != "tfs"]] if (r := arm_report(name))}
    if "tfs" not in reports:
        print("no TFS curve yet: run the tfs arm first", file=sys.stderr)
        return 1
    print(table(reports))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vpgtrans.json").write_text(json.dumps(reports, indent=1))
    print(f"results: {RESULTS / 'vpgtrans.json'}")
    if plot(reports, RESULTS / "vpgtrans_curves.png"):
        print(f"plot: {RESULTS / 'vpgtrans_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
