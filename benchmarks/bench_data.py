"""Data loading vs the training step: is the data loader ever the bottleneck?

One run measures, side by side, on the real demo data path and model:

1. Loader throughput (samples/s) of the training DataLoader, built exactly as
   `Trainer._loader` builds it (VLMDataset over the Tux Paint train manifest, MobileNetV2 160 px
   image transform, SmolLM2 tokenizer, plain template, StepSampler, Collator, persistent workers),
   for each `--workers` count, after a few warm-up batches. The time to the first batch (worker
   start-up included) is reported separately.
2. The training step's consumption rate (samples/s): frozen MobileNetV2 -> Q-Former resampler
   (8 queries, 2 layers, hidden 256, 4 heads) -> linear projector -> frozen SmolLM2-135M, fp32,
   one process; forward, backward, gradient clipping and a torch AdamW step over the trainable
   parameters (the groups `build_param_groups` makes for the Trainer), on batches collated
   beforehand, so no loading happens in the timed region. DeepSpeed is left out: on one process
   its ZeRO-2 engine costs about the same as this loop (benchmarks/bench_step.py).
3. loader rate / step rate per worker count (> 1: the loader keeps up), and the same training
   loop fed by that loader: training throughput with loading, and the share of each step spent
   waiting for the batch (with 0 workers: loading inline, the share of each step spent loading).

A per-sample breakdown (manifest sample -> tokens, image decode, image transform, tensors;
collate per sample) shows where the loader's time goes.

    python benchmarks/bench_data.py                  # table + benchmarks/results/data_pipeline.json
    python benchmarks/bench_data.py --batches 40 --steps 10 --workers 0,1,2 --batch-size 8

The assets (`tuxpaint`, `mobilenetv2`, `smollm2-135m`) are prepared first when missing.
Step times are medians after `--skip` warm-up steps; other tenants' load bursts only ever add
time, so rates on a shared machine are lower bounds.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, environment, save_json, write_yaml  # noqa: E402

ASSETS = ("tuxpaint", "mobilenetv2", "smollm2-135m")


def demo_config(output_dir: Path, batch_size: int) -> dict[str, Any]:
    """The run config of the demo model on the Tux Paint captions (assets named by reference)."""
    return {
        "output_dir": str(output_dir),
        "micro_batch_size": batch_size,
        "precision": "fp32",
        "progress_bar": False,
        "seed": 0,
        "model": {
            "vision": {"kind": "mobilenetv2", "name_or_path": "asset:mobilenetv2", "trainable": "frozen"},
            "resampler": {"kind": "qformer", "num_queries": 8, "num_layers": 2, "hidden_size": 256, "num_heads": 4},
            "projector": {"kind": "linear"},
            "llm": {"name_or_path": "asset:smollm2-135m", "trainable": "frozen"},
        },
        "data": {"train": "asset:tuxpaint/train.jsonl", "template": "plain", "max_length": 64},
        "optim": {"lr": 1e-4, "weight_decay": 0.0},
        "checkpoint": {"save_every": 0, "resume": "never"},
    }


def prepare_assets() -> None:
    """Prepare every asset the benchmark reads (a no-op once they are in the cache)."""
    from mmtrain.assets import AssetError, prepare

    for name in ASSETS:
        try:
            prepare(name)
        except AssetError as exc:
            sys.exit(f"asset {name!r} could not be prepared ({exc}); run: mmtrain assets prepare {' '.join(ASSETS)}")


def make_loader(dataset, collator, cfg, num_workers: int):
    """The training DataLoader, as `Trainer._loader` builds it on rank 0 of 1 from step 0."""
    from torch.utils.data import DataLoader

    from mmtrain.data import StepSampler

    sampler = StepSampler(len(dataset), cfg.micro_batch_size, 0, 1, cfg.seed, shuffle=cfg.data.shuffle)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    """Forward, backward, gradient clipping and an AdamW step of the model on one batch."""

    def __init__(self, model, cfg, device) -> None:
        import torch

        from mmtrain.engine.optim import build_param_groups

        self.model = model.to(device).train()
        self.device = device
        self.grad_clip = cfg.grad_clip
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(build_param_groups(model, cfg.optim), betas=cfg.optim.betas,
                                           eps=cfg.optim.eps)

    def __call__(self, batch: dict) -> None:
        import torch

        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)


def measure_step(step: StepRunner, batches: list[dict], skip: int) -> dict[str, Any]:
    """Median step time on batches collated beforehand (the first `skip` steps left out)."""
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    kept = times[skip:]
    return {"median_s": statistics.median(kept), "mean_s": statistics.fmean(kept), "min_s": min(kept),
            "steps": len(kept)}


def measure_workers(dataset, collator, cfg, step: StepRunner, num_workers: int, batches: int, warmup: int,
                    steps: int, skip: int) -> dict[str, Any]:
    """Loader throughput, then the training loop fed by the same (already started) loader."""
    batch_size = cfg.micro_batch_size
    loader = make_loader(dataset, collator, cfg, num_workers)
    t0 = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    startup_s = time.perf_counter() - t0
    for _ in range(warmup):
        next(iterator)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    loader_s = time.perf_counter() - t0

    waits, totals = [], []
    for _ in range(skip + steps):
        t0 = time.perf_counter()
        batch = next(iterator)
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        totals.append(t2 - t0)
    waits, totals = waits[skip:], totals[skip:]
    del iterator, loader  # shuts the persistent workers down
    gc.collect()
    return {
        "num_workers": num_workers,
        "startup_s": startup_s,
        "loader_batches": batches,
        "loader_s": loader_s,
        "loader_samples_per_s": batches * batch_size / loader_s,
        "train_with_loading": {
            "steps": steps,
            "median_step_s": statistics.median(totals),
            "samples_per_s": batch_size * len(totals) / sum(totals),
            "wait_share": sum(waits) / sum(totals),
            "median_wait_s": statistics.median(waits),
        },
    }


def per_sample_breakdown(dataset, collator, count: int) -> dict[str, Any]:
    """Where one sample's loading time goes, single-threaded, over the first `count` samples.

    Parts: `tokenize` (prompt template + tokenizer), `decode` (read, PNG decode, EXIF, RGBA onto
    white), `transform` (the tower's image_transform: resize to 160 px, scale to [-1, 1]),
    `whole_sample` (`VLMDataset.load`, all of the above plus the tensors) and `collate` (per sample).
    """
    from mmtrain.data import load_image

    parts: dict[str, list[float]] = {"tokenize": [], "decode": [], "transform": [], "whole_sample": []}
    items = []
    for index in range(min(count, len(dataset))):
        sample = dataset.samples[index]
        t0 = time.perf_counter()
        dataset.template.encode(sample, dataset.tokenizer, dataset.num_image_tokens)
        t1 = time.perf_counter()
        image = load_image(sample.image)
        t2 = time.perf_counter()
        dataset.image_transform(image)
        t3 = time.perf_counter()
        items.append(dataset.load(index))
        t4 = time.perf_counter()
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name].append(seconds)
    batch_size = 8
    collate_s = []
    for start in range(0, len(items) - batch_size + 1, batch_size):
        t0 = time.perf_counter()
        collator(items[start:start + batch_size])
        collate_s.append((time.perf_counter() - t0) / batch_size)
    result = {name: {"mean_ms": 1e3 * statistics.fmean(v), "median_ms": 1e3 * statistics.median(v)}
              for name, v in parts.items()}
    result["collate"] = {"mean_ms": 1e3 * statistics.fmean(collate_s), "median_ms": 1e3 * statistics.median(collate_s)}
    result["samples"] = len(items)
    return result


def parse_workers(text: str) -> list[int]:
    try:
        workers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not workers or any(w < 0 for w in workers):
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected non-negative integers, e.g. 0,1,2")
    return workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="loader batches timed per worker count")
    parser.add_argument("--warmup", type=int, default=4, help="loader batches before timing (after the first)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per arm")
    parser.add_argument("--skip", type=int, default=2, help="training steps before timing, per arm")
    parser.add_argument("--workers", type=parse_workers, default=[0, 1, 2], help="DataLoader num_workers to compare")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    parser.add_argument("--profile-samples", type=int, default=100, help="samples in the per-sample breakdown")
    parser.add_argument("--device", default=None, help="training device (default: cuda when available, else cpu)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_data")
    args = parser.parse_args()
    for name in ("batches", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    import mmtrain.engine  # noqa: F401  (selects DeepSpeed's accelerator before deepspeed is imported)
    import torch

    from mmtrain.config import load_config
    from mmtrain.data import Collator, VLMDataset
    from mmtrain.models import build_vlm

    started = time.perf_counter()
    prepare_assets()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(write_yaml(demo_config(args.workdir / "run", args.batch_size), args.workdir / "config.yaml"))
    model, tokenizer, _ = build_vlm(cfg.model)
    dataset = VLMDataset.for_model(cfg.data.train, model, tokenizer, cfg.data)
    collator = Collator(tokenizer.pad_token_id)
    print(f"{len(dataset)} samples, {model.num_image_tokens} image tokens, micro-batch {args.batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}", flush=True)

    breakdown = per_sample_breakdown(dataset, collator, args.profile_samples)
    print("per sample (ms, mean): " + ", ".join(f"{k} {v['mean_ms']:.2f}" for k, v in breakdown.items()
                                                if isinstance(v, dict)), flush=True)

    step = StepRunner(model, cfg, device)
    prebuilt_loader = iter(make_loader(dataset, collator, cfg, 0))
    prebuilt = [next(prebuilt_loader) for _ in range(args.skip + args.steps)]
    del prebuilt_loader
    step_stats = measure_step(step, prebuilt, args.skip)
    step_rate = args.batch_size / step_stats["median_s"]
    tokens = [int(b["attention_mask"].sum()) / b["input_ids"].shape[0] for b in prebuilt]
    print(f"training step on pre-built batches: median {step_stats['median_s']:.3f} s = {step_rate:.1f} samples/s",
          flush=True)

    rows = []
    for num_workers in args.workers:
        row = measure_workers(dataset, collator, cfg, step, num_workers, args.batches, args.warmup, args.steps,
                              args.skip)
        row["loader_over_step"] = row["loader_samples_per_s"] / step_rate
        # With loading inline, each step would take load time + step time.
        load_s = args.batch_size / row["loader_samples_per_s"]
        row["predicted_inline_load_share"] = load_s / (load_s + step_stats["median_s"])
        rows.append(row)
        print(f"num_workers={num_workers}: loader {row['loader_samples_per_s']:.1f} samples/s "
              f"(startup {row['startup_s']:.2f} s), training with loading "
              f"{row['train_with_loading']['samples_per_s']:.1f} samples/s, "
              f"waiting {100 * row['train_with_loading']['wait_share']:.1f}% of each step", flush=True)

    report = {
        "benchmark": "data loader throughput vs training-step consumption (is the loader a bottleneck?)",
        "date": time.strftime("%Y-%m-%d"), "environment": environment(),
        "setup": {
            "data": "Tux Paint stamps train manifest (asset:tuxpaint/train.jsonl), plain template",
            "samples": len(dataset), "mean_tokens_per_sample": statistics.fmean(tokens),
            "vision": "MobileNetV2 (real, frozen), 160 px", "num_image_tokens": model.num_image_tokens,
            "resampler": "qformer 8 queries, 2 layers, hidden 256, 4 heads", "projector": "linear",
            "llm": "SmolLM2-135M-Instruct (real, frozen)", "precision": "fp32", "device": str(device),
            "torch_threads": torch.get_num_threads(), "micro_batch_size": args.batch_size,
            "loader_batches": args.batches, "loader_warmup": args.warmup, "steps": args.steps, "skip": args.skip,
            "step": "forward + backward + clip_grad_norm + torch AdamW, one process, no DeepSpeed",
        },
        "per_sample_breakdown": breakdown,
        "step_prebuilt": {**step_stats, "samples_per_s": step_rate},
        "workers": rows,
        "wall_s": time.perf_counter() - started,
    }
    path = save_json(report, "data_pipeline.json")

    print(f"\ntraining step on pre-built batches: {step_rate:.1f} samples/s (median {step_stats['median_s']:.3f} s "
          f"per step of {args.batch_size})\n")
    header = (f"{'workers':>7} {'startup (s)':>11} {'loader (samples/s)':>18} {'loader / step':>13} "
              f"{'train with loading (samples/s)':>30} {'waiting for data':>16}")
    print(header)
    for row in rows:
        e2e = row["train_with_loading"]
        print(f"{row['num_workers']:>7} {row['startup_s']:>11.2f} {row['loader_samples_per_s']:>18.1f} "
              f"{row['loader_over_step']:>13.1f} {e2e['samples_per_s']:>30.1f} {100 * e2e['wait_share']:>15.1f}%")
    print("\nper sample (ms): " + ", ".join(f"{k} {v['median_ms']:.2f} median / {v['mean_ms']:.2f} mean"
                                          for k, v in breakdown.items() if isinstance(v, dict)))
    print(f"\nwrote {path} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
