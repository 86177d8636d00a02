"""What a preemption costs, and how well the cost model predicts, on real weights under a real SLURM cluster.

The demo's model (frozen pretrained MobileNetV2 + SmolLM2-135M-Instruct, MLP resampler + projector
trained on real Tux Paint captions) trains for STEPS steps as a one-stage recipe submitted with
`mmtrain submit` to the local SLURM cluster (tools/slurm/cluster-up.sh), twice, one after the other:
  - straight:  uninterrupted;
  - preempted: `scancel --signal=USR1` half-way: checkpoint, requeue, resume.
Then `mmtrain cost` on both (MFU against this CPU's measured fp32 matmul peak; the preempted run with
the straight one as its baseline), `mmtrain cost estimate` of the same recipe (this CPU, and an H100),
and the price of one ledger append next to a training step.

    python benchmarks/bench_cost.py [--steps 40]

Writes benchmarks/results/cost.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "bench_cost"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}


def mmtrain(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"mmtrain {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def cpu_peak_tflops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul throughput of this machine (all threads torch uses), the MFU denominator here."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def ledger_append_us(count: int = 500) -> float:
    """Median microseconds of one ledger append (lock + write + fsync) of a process_end-sized record."""
    from mmtrain.cost.ledger import Ledger

    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(path=Path(folder) / "ledger.jsonl", run="r", stage="s", attempt="a")
        times = [_timed(lambda: ledger.write("checkpoint", step=i, padding="x" * 600)) for i in range(count)]
    return statistics.median(times) * 1e6


def write_recipe(folder: Path, steps: int) -> Path:
    recipe = {"name": "costbench", "output_dir": str(folder / "run"), "defaults": str(REPO / "configs" / "demo_base.yaml"),
              "slurm": {"gpus_per_node": 1, "gres_type": "", "gpu_type": "cpu"},
              "stages": [{"name": "caption", "set": {"max_steps": steps, "log_every": 1, "eval_every": 0,
                                                     "checkpoint": {"save_every": steps // 4, "keep_last": 1}}}]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_arm(name: str, steps: int, preempt_at: int | None) -> dict:
    folder = RUNS / name
    shutil.rmtree(folder, ignore_errors=True)
    recipe = write_recipe(folder, steps)
    mmtrain("submit", str(recipe))
    run = folder / "run"
    job = json.loads((run / "slurm" / "jobs.json").read_text())["stages"][0]["job_id"]
    if preempt_at is not None:
        metrics = run / "01-caption" / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= preempt_at):
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
    status = json.loads(subprocess.run([sys.executable, "-m", "mmtrain", "status", str(run), "--wait", "1800",
                                        "--json"], cwd=REPO, env=ENV, capture_output=True, text=True).stdout)
    if not status["ok"]:
        raise SystemExit(f"{name}: the job did not complete: {status}")
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "01-caption" / "metrics.jsonl").read_text()
                                                  .splitlines()) if "loss" in r}
    return {"run": run, "job": job, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "mmtrain", "assets", "prepare", "tuxpaint", "mobilenetv2", "smollm2-135m"],
                   cwd=REPO, env=ENV, check=True, capture_output=True)
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        subprocess.run(["bash", str(REPO / "tools" / "slurm" / "cluster-up.sh")], check=True)
    peak = cpu_peak_tflops()
    append_us = ledger_append_us()
    arms = {"straight": run_arm("straight", args.steps, None),
            "preempted": run_arm("preempted", args.steps, args.steps // 2)}
    peak_text = f"{peak:.4f}"
    mmtrain("cost", str(arms["straight"]["run"]), "--wait", "120", "--peak-tflops", peak_text)
    mmtrain("cost", str(arms["preempted"]["run"]), "--wait", "120", "--peak-tflops", peak_text,
            "--baseline", str(arms["straight"]["run"]))
    reports = {name: json.loads((arm["run"] / "cost" / "report.json").read_text()) for name, arm in arms.items()}
    measured_mfu = reports["straight"]["total"]["mfu"]
    recipe = RUNS / "straight" / "recipe.yaml"
    mmtrain("cost", "estimate", str(recipe), "--gpus", "1", "--gpu-type", "cpu", "--peak-tflops", peak_text,
            "--mfu", f"{measured_mfu:.6f}", "--out", str(RUNS / "estimate-cpu.json"))
    mmtrain("cost", "estimate", str(recipe), "--gpus", "1", "--gpu-type", "h100",
            "--out", str(RUNS / "estimate-h100.json"))
    estimate_cpu = json.loads((RUNS / "estimate-cpu.json").read_text())
    estimate_h100 = json.loads((RUNS / "estimate-h100.json").read_text())

    def arm_row(name: str) -> dict:
        total = reports[name]["total"]
        return {key: total.get(key) for key in (
            "allocated_gpu_hours", "productive_gpu_hours", "overhead_gpu_hours", "wasted_gpu_hours",
            "interrupted_gpu_hours", "attempts", "steps", "tokens", "flops", "tokens_per_gpu_s", "mfu")} | {
            "overhead_parts_gpu_hours": total.get("overhead_parts_gpu_hours")}

    rows = {name: arm_row(name) for name in arms}
    straight, preempted = rows["straight"], rows["preempted"]
    same_losses = arms["straight"]["losses"] == arms["preempted"]["losses"]
    step_s = straight["productive_gpu_hours"] * 3600 / max(straight["steps"], 1)
    result = {
        "benchmark": "cost", "steps": args.steps, "machine": "2-core CPU, local SLURM cluster (1 task per job)",
        "cpu_peak_tflops_fp32": peak, "ledger_append_us": append_us,
        "ledger_append_share_of_step": append_us * 1e-6 / step_s,
        "arms": rows,
        "preempted_vs_straight": {
            "allocated": preempted["allocated_gpu_hours"] / straight["allocated_gpu_hours"],
            "productive": preempted["productive_gpu_hours"] / straight["productive_gpu_hours"],
            "baseline_ratios": reports["preempted"]["baseline"]["ratios"] if reports["preempted"].get("baseline") else None,
        },
        "losses_identical": same_losses,
        "estimate_cpu": {"flops": estimate_cpu["total"]["flops"], "gpu_hours": estimate_cpu["total"]["gpu_hours"],
                         "tokens_per_sample": estimate_cpu["stages"][0]["tokens_per_sample"],
                         "tokens_source": estimate_cpu["stages"][0]["tokens_source"]},
        "estimate_h100": {"flops": estimate_h100["total"]["flops"], "gpu_hours": estimate_h100["total"]["gpu_hours"],
                          "memory_per_gpu_gib": estimate_h100["stages"][0]["memory_per_gpu_gib"]["total"]},
        "predicted_vs_actual_flops": estimate_cpu["total"]["flops"] / straight["flops"],
        "predicted_vs_actual_productive_hours": estimate_cpu["total"]["gpu_hours"] / straight["productive_gpu_hours"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {RESULTS / 'cost.json'}")
    return 0


def format_table(result: dict) -> str:
    lines = [f"{result['steps']} steps of 8 captions, SmolLM2-135M + MobileNetV2, fp32; device = one CPU job "
             f"(peak {result['cpu_peak_tflops_fp32']:.3f} TFLOP/s fp32 matmul)",
             f"{'arm':<10} {'alloc s':>8} {'product s':>9} {'overhead s':>10} {'wasted s':>8} {'interr s':>8} "
             f"{'attempts':>8} {'steps':>5} {'tok/s':>7} {'MFU':>7}"]
    for name, row in result["arms"].items():
        lines.append(f"{name:<10} {row['allocated_gpu_hours'] * 3600:>8.1f} {row['productive_gpu_hours'] * 3600:>9.1f} "
                     f"{row['overhead_gpu_hours'] * 3600:>10.1f} {row['wasted_gpu_hours'] * 3600:>8.1f} "
                     f"{row['interrupted_gpu_hours'] * 3600:>8.1f} {row['attempts']:>8} {row['steps']:>5} "
                     f"{row['tokens_per_gpu_s']:>7.1f} {row['mfu']:>7.2%}")
    ratio = result["preempted_vs_straight"]
    lines += [f"preempted / straight: allocated {ratio['allocated']:.2f}x, productive {ratio['productive']:.2f}x; "
              f"losses identical step by step: {result['losses_identical']}",
              f"estimate (this CPU, at the measured MFU): FLOPs {result['predicted_vs_actual_flops']:.3f}x the ledger's, "
              f"GPU-hours {result['predicted_vs_actual_productive_hours']:.2f}x the productive hours",
              f"estimate on one H100 (MFU 0.5 fp32 default): {result['estimate_h100']['gpu_hours'] * 3600:.2f} GPU-seconds, "
              f"{result['estimate_h100']['memory_per_gpu_gib']:.2f} GiB",
              f"ledger append (lock + write + fsync): {result['ledger_append_us']:.0f} us = "
              f"{result['ledger_append_share_of_step']:.2e} of a training step"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
