"""Padding in mixed-length batches: padded vs length-grouped vs packed, side by side in one run.

The set mixes what a VLM trains on: easy-VQA questions (one-word answers), Tux Paint captions and
long text-only prose continuations, with the real frozen SmolLM2-135M behind the demo's DINOv2-S +
MLP resampler (16 visual tokens). Every arm reads the frozen tower's outputs from one shared feature
cache, so the comparison is about the language side, where padding costs. Arms:
  padded   8 samples per micro-batch, right-padded to the longest
  grouped  the same with data.group_by: length
  packed   data.packing: true, 4 rows of max_length (256) positions per micro-batch
  padded24, grouped24   24 samples per micro-batch, about as many as the packed rows hold: bigger
           steps alone are faster per token on a CPU, these arms separate that from the padding
Per arm: padding fraction (share of positions that are padding), tokens/s (real tokens), step time.

    python benchmarks/bench_packing.py            # resumable: finished arms are read back

Writes benchmarks/results/packing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import environment, run_mmtrain, save_json, train_arm  # noqa: E402

ASSETS = ["easy-vqa", "tuxpaint", "prose", "dinov2-small", "smollm2-135m"]
ARMS = {"padded": {"micro_batch_size": 8}, "grouped": {"micro_batch_size": 8, "data.group_by": "length"},
        "packed": {"micro_batch_size": 4, "data.packing": True},
        "padded24": {"micro_batch_size": 24}, "grouped24": {"micro_batch_size": 24, "data.group_by": "length"}}


def mixed_manifest(workdir: Path) -> Path:
    """600 easy-VQA questions + every Tux Paint caption + every prose sample, image paths made absolute."""
    from mmtrain.assets.registry import resolve_asset_reference

    out = workdir / "mixed.jsonl"
    if out.is_file():
        return out
    lines = []
    for manifest, limit in (("asset:easy-vqa/train.jsonl", 600), ("asset:tuxpaint/train.jsonl", None),
                            ("asset:prose/train.jsonl", None)):
        path = Path(resolve_asset_reference(manifest))
        for line in path.read_text().splitlines()[:limit]:
            record = json.loads(line)
            if record.get("image"):
                record["image"] = str((path.parent / record["image"]).resolve())
            lines.append(json.dumps(record))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def arm_config(manifest: Path, cache: Path, steps: int, overrides: dict) -> dict:
    cfg = {"deepspeed": str(REPO / "ds_configs" / "zero2.json"), "precision": "fp32", "seed": 0, "max_steps": steps,
           "log_every": 1, "progress_bar": False,
           "model": {"vision": {"kind": "hf", "name_or_path": "asset:dinov2-small", "trainable": "frozen",
                                "feature_layer": -4},
                     "resampler": {"kind": "mlp", "hidden_size": 512, "spatial_merge": 4},
                     "projector": {"kind": "linear"},
                     "llm": {"name_or_path": "asset:smollm2-135m", "trainable": "frozen"}},
           "data": {"train": str(manifest), "template": "chatml", "max_length": 256, "feature_cache": str(cache)},
           "optim": {"lr": 1e-3, "warmup_steps": 2}, "checkpoint": {"save_every": 0, "resume": "never"}}
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def summarize(records: list[dict], skip: int) -> dict:
    kept = records[skip:]
    tokens = [r["tokens_per_s"] * r["step_time_s"] for r in kept]
    return {"steps": len(kept), "padding_fraction": statistics.fmean(r["padding_fraction"] for r in kept),
            "tokens_per_step": statistics.fmean(tokens), "step_time_s": statistics.median(r["step_time_s"] for r in kept),
            "tokens_per_s": sum(tokens) / sum(r["step_time_s"] for r in kept),
            "samples_per_step": (kept[-1]["samples"] - records[skip - 1]["samples"]) / len(kept) if skip else None,
            "final_loss": records[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_packing")
    args = parser.parse_args()
    run_mmtrain(["assets", "prepare", *ASSETS])
    manifest = mixed_manifest(args.workdir)
    results = {}
    for name, overrides in ARMS.items():
        records, _ = train_arm(arm_config(manifest, args.workdir / "cache", args.steps, overrides),
                               args.workdir / name)
        results[name] = summarize(records, args.skip)
    base = results["padded"]["tokens_per_s"]
    print(f"\n{'arm':<8} {'padding':>8} {'samples/step':>12} {'tokens/step':>11} {'s/step':>7} {'tokens/s':>9} "
          f"{'x padded':>8}")
    for name, r in results.items():
        print(f"{name:<8} {100 * r['padding_fraction']:>7.1f}% {r['samples_per_step']:>12.1f} "
              f"{r['tokens_per_step']:>11.0f} {r['step_time_s']:>7.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['tokens_per_s'] / base:>8.2f}")
    path = save_json({"command": "python benchmarks/bench_packing.py", "steps": args.steps, "skip": args.skip,
                      "arms": results, "environment": environment()}, "packing.json")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
