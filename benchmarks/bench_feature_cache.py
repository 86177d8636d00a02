"""The frozen-tower feature cache: step time with and without it, and the CPU time it saves an experiment.

The demo's model (real DINOv2-S, 9th block, MLP resampler merging 4x4 -> 16 tokens, frozen real
SmolLM2-135M) on Tux Paint captions, side by side in one run:
  tower  no cache: every step decodes its images and runs the frozen tower
  cold   data.feature_cache on an empty folder: the run first computes every image's features once
  warm   the same folder again: features read back memory-mapped, no decoding, no tower
Reported: median step time and CPU seconds per step of each arm, the cold run's one-off build time,
and the CPU time an experiment of `--project-arms` arms x `--project-steps` steps over the same
images saves (e.g. the four VPGTrans arms), counting the build once.

    python benchmarks/bench_feature_cache.py      # resumable: finished arms are read back

Writes benchmarks/results/feature_cache.json.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import environment, run_mmtrain, save_json, train_arm  # noqa: E402

ASSETS = ["tuxpaint", "dinov2-small", "smollm2-135m"]
READY = re.compile(r"feature cache \S+: (\d+) images ready \((\d+) computed\) in ([\d.]+) s")


def arm_config(steps: int, cache: Path | None) -> dict:
    return {"deepspeed": str(REPO / "ds_configs" / "zero2.json"), "precision": "fp32", "seed": 0, "max_steps": steps,
            "log_every": 1, "progress_bar": False, "micro_batch_size": 8,
            "model": {"vision": {"kind": "hf", "name_or_path": "asset:dinov2-small", "trainable": "frozen",
                                 "feature_layer": -4},
                      "resampler": {"kind": "mlp", "hidden_size": 512, "spatial_merge": 4},
                      "projector": {"kind": "linear"},
                      "llm": {"name_or_path": "asset:smollm2-135m", "trainable": "frozen"}},
            "data": {"train": "asset:tuxpaint/train.jsonl", "template": "plain", "max_length": 96,
                     "feature_cache": str(cache) if cache else None},
            "optim": {"lr": 1e-3, "warmup_steps": 2}, "checkpoint": {"save_every": 0, "resume": "never"}}


def summarize(records: list[dict], skip: int) -> dict:
    kept = records[skip:]
    cpu = [b["cpu_s"] - a["cpu_s"] for a, b in zip(records[skip - 1:], kept)]
    return {"steps": len(kept), "step_time_s": statistics.median(r["step_time_s"] for r in kept),
            "cpu_s_per_step": statistics.median(cpu), "losses": [r["loss"] for r in records]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    parser.add_argument("--project-arms", type=int, default=4)
    parser.add_argument("--project-steps", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_feature_cache")
    args = parser.parse_args()
    run_mmtrain(["assets", "prepare", *ASSETS])
    cache = args.workdir / "cache"
    results, build = {}, {}
    for name, folder_cache in (("tower", None), ("cold", cache), ("warm", cache)):
        records, log = train_arm(arm_config(args.steps, folder_cache), args.workdir / name)
        results[name] = summarize(records, args.skip)
        if folder_cache is not None:
            images, computed, seconds = READY.search(log).groups()
            build[name] = {"images": int(images), "computed": int(computed), "seconds": float(seconds)}
    tower, warm = results["tower"], results["warm"]
    build_s = build["cold"]["seconds"]
    saved_per_step = tower["step_time_s"] - warm["step_time_s"]
    total = args.project_arms * args.project_steps
    projection = {"arms": args.project_arms, "steps_per_arm": args.project_steps,
                  "seconds_without_cache": total * tower["step_time_s"],
                  "seconds_with_cache": total * warm["step_time_s"] + build_s,
                  "cpu_seconds_saved": total * saved_per_step - build_s}
    print(f"\n{'arm':<6} {'s/step':>7} {'CPU s/step':>10} {'cache build':>12}")
    for name, r in results.items():
        b = f"{build[name]['seconds']:.1f}s ({build[name]['computed']})" if name in build else "-"
        print(f"{name:<6} {r['step_time_s']:>7.3f} {r['cpu_s_per_step']:>10.3f} {b:>12}")
    print(f"\nstep time with the cache: {warm['step_time_s'] / tower['step_time_s']:.2f}x the tower's; "
          f"{args.project_arms} arms x {args.project_steps} steps: {projection['seconds_without_cache']:.0f} s -> "
          f"{projection['seconds_with_cache']:.0f} s (build included), "
          f"{projection['cpu_seconds_saved']:.0f} s saved")
    losses_equal = max(abs(a - b) for a, b in zip(results["tower"]["losses"], results["warm"]["losses"]))
    print(f"largest loss difference, tower vs warm cache: {losses_equal:.2e}")
    path = save_json({"command": "python benchmarks/bench_feature_cache.py", "steps": args.steps, "skip": args.skip,
                      "arms": results, "build": build, "projection": projection,
                      "max_loss_difference": losses_equal, "environment": environment()}, "feature_cache.json")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
