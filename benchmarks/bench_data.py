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
   loop fed by each loader: training throughput with loading, and the share of each step spent
   waiting for the batch (with 0 workers, loading inline: the share of each step spent loading).
   The training arms (pre-built batches, and one per worker count) take turns step by step in a
   rotating order, so the shared machine's load bursts fall on all of them alike. The loaders'
   workers therefore have a whole round to prepare a batch; with loader / step far above 1 that
   changes nothing, since a worker needs a small fraction of one step for a batch.

A per-sample breakdown (manifest sample -> tokens, image decode, image transform, tensors;
collate per sample) shows where the loader's time goes.

    python benchmarks/bench_data.py                  # table + benchmarks/results/data_pipeline.json
    python benchmarks/bench_data.py --batches 40 --steps 10 --workers 0,1,2 --batch-size 8

The assets (`tuxpaint`, `mobilenetv2`, `smollm2-135m`) are prepared first when missing.
Step rates come from median step times after `--skip` warm-up steps per arm; loader rates from
the wall time of `--batches` consecutive batches. Other tenants' load bursts only ever add time,
so on a shared machine every rate is a lower bound; compare arms of one run, not runs.
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


def make_loader(dataset, collator, cfg, num_workers: int, start_batch: int = 0):
    """The training DataLoader, as `Trainer._loader` builds it on rank 0 of 1."""
    from torch.utils.data import DataLoader

    from mmtrain.data import StepSampler

    sampler = StepSampler(len(dataset), cfg.micro_batch_size, 0, 1, cfg.seed, shuffle=cfg.data.shuffle,
                          start_batch=start_batch)
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


def measure_loader(dataset, collator, cfg, num_workers: int, batches: int, warmup: int):
    """Throughput of a fresh training DataLoader after `warmup` batches.

    Returns:
        (stats, iterator): the iterator stays open (its persistent workers alive) for the training arms.
    """
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
    stats = {"num_workers": num_workers, "startup_s": startup_s, "loader_batches": batches, "loader_s": loader_s,
             "loader_samples_per_s": batches * cfg.micro_batch_size / loader_s}
    return stats, iterator


def measure_training(step: StepRunner, prebuilt: list[dict], iterators: dict[int, Any], steps: int,
                     skip: int) -> dict[str, dict[str, list[float]]]:
    """Per-step wait and total times of every arm, the arms taking turns step by step.

    Arm `prebuilt` steps on batches collated beforehand (no loading); arm N fetches each batch from
    the N-worker loader first. Taking turns spreads the shared machine's load bursts evenly over the
    arms; the order rotates every round so that no arm always follows another.
    """
    arms: list[Any] = ["prebuilt", *iterators]
    times: dict[Any, dict[str, list[float]]] = {arm: {"wait_s": [], "total_s": []} for arm in arms}
    for round_index in range(skip + steps):
        shift = round_index % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            t0 = time.perf_counter()
            batch = prebuilt[round_index] if arm == "prebuilt" else next(iterators[arm])
            t1 = time.perf_counter()
            step(batch)
            t2 = time.perf_counter()
            if round_index >= skip:
                times[arm]["wait_s"].append(t1 - t0)
                times[arm]["total_s"].append(t2 - t0)
    return times


def step_stats(times: dict[str, list[float]], batch_size: int) -> dict[str, Any]:
    """Rates and the waiting share of one training arm's timed steps."""
    total, wait = times["total_s"], times["wait_s"]
    return {"steps": len(total), "median_step_s": statistics.median(total), "min_step_s": min(total),
            "samples_per_s": batch_size / statistics.median(total),
            "wait_share": sum(wait) / sum(total), "median_wait_s": statistics.median(wait),
            "step_times_s": total}


def per_sample_breakdown(dataset, collator, count: int, batch_size: int) -> dict[str, Any]:
    """Where one sample's loading time goes, in this process, over the first `count` image samples.

    Parts: `tokenize` (prompt template + tokenizer), `decode` (read, PNG decode, EXIF, RGBA onto
    white), `transform` (the tower's image_transform: resize to 160 px, scale to [-1, 1]),
    `whole_sample` (`VLMDataset.load`, all of the above plus the tensors) and `collate` (per sample).
    """
    from mmtrain.data import load_image

    parts: dict[str, list[float]] = {"tokenize": [], "decode": [], "transform": [], "whole_sample": []}
    items = []
    for index, sample in enumerate(dataset.samples):
        if len(items) == count:
            break
        if sample.image is None:
            continue
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
    if not items:
        return {"samples": 0}
    collate_s = []
    for start in range(0, max(len(items) - batch_size, 0) + 1, batch_size):
        chunk = items[start:start + batch_size]
        t0 = time.perf_counter()
        collator(chunk)
        collate_s.append((time.perf_counter() - t0) / len(chunk))
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
    parser.add_argument("--skip", type=int, default=2, help="training steps per arm before timing")
    parser.add_argument("--workers", type=parse_workers, default=[0, 1, 2], help="DataLoader num_workers to compare")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    parser.add_argument("--profile-samples", type=int, default=100, help="samples in the per-sample breakdown")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the training process (default: torch's, as in training)")
    parser.add_argument("--device", default=None, help="training device (default: cuda when available, else cpu)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_data")
    args = parser.parse_args()
    for name in ("batches", "steps", "batch_size", "profile_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.skip < 0:
        parser.error("--warmup and --skip must not be negative")

    import mmtrain.engine  # noqa: F401  (selects DeepSpeed's accelerator before deepspeed is imported)
    import torch

    from mmtrain.config import load_config
    from mmtrain.data import Collator, VLMDataset
    from mmtrain.models import build_vlm

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_assets()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(write_yaml(demo_config(args.workdir / "run", args.batch_size), args.workdir / "config.yaml"))
    model, tokenizer, _ = build_vlm(cfg.model)
    dataset = VLMDataset.for_model(cfg.data.train, model, tokenizer, cfg.data)
    collator = Collator(tokenizer.pad_token_id)
    batch_size = args.batch_size
    print(f"{len(dataset)} samples, {model.num_image_tokens} visual tokens per sample, micro-batch {batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}", flush=True)

    breakdown = per_sample_breakdown(dataset, collator, args.profile_samples, batch_size)
    print("per sample (ms, median): " + ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in breakdown.items()
                                                  if isinstance(v, dict)), flush=True)

    # Loader workers are forked here, before the model moves to its device: forking a process that
    # has initialised CUDA is unsafe.
    loaders, iterators = [], {}
    for num_workers in args.workers:
        stats, iterators[num_workers] = measure_loader(dataset, collator, cfg, num_workers, args.batches, args.warmup)
        loaders.append(stats)
        print(f"num_workers={num_workers}: loader {stats['loader_samples_per_s']:.1f} samples/s, first batch after "
              f"{stats['startup_s']:.2f} s", flush=True)

    # The batches the loaders give next (after the first, the warm-up and the timed ones): every
    # training arm steps on the same batches.
    prebuilt_iterator = iter(make_loader(dataset, collator, cfg, 0, start_batch=1 + args.warmup + args.batches))
    prebuilt = [next(prebuilt_iterator) for _ in range(args.skip + args.steps)]
    del prebuilt_iterator
    step = StepRunner(model, cfg, device)
    times = measure_training(step, prebuilt, iterators, args.steps, args.skip)
    del iterators  # shuts the persistent workers down
    gc.collect()

    prebuilt_stats = step_stats(times["prebuilt"], batch_size)
    step_rate = prebuilt_stats["samples_per_s"]
    rows = []
    for stats in loaders:
        train = step_stats(times[stats["num_workers"]], batch_size)
        # With loading inline (0 workers), each step takes load time + step time.
        load_s = batch_size / stats["loader_samples_per_s"]
        rows.append({**stats, "loader_over_step": stats["loader_samples_per_s"] / step_rate,
                     "predicted_inline_load_share": load_s / (load_s + prebuilt_stats["median_step_s"]),
                     "train_with_loading": train})
    tokens = [int(b["attention_mask"].sum()) / b["input_ids"].shape[0] for b in prebuilt]
    report = {
        "benchmark": "data loader throughput vs training-step consumption (is the loader a bottleneck?)",
        "date": time.strftime("%Y-%m-%d"), "environment": environment(),
        "setup": {
            "data": "Tux Paint stamps train manifest (asset:tuxpaint/train.jsonl), plain template",
            "samples": len(dataset), "mean_tokens_per_sample": statistics.fmean(tokens),
            "vision": "MobileNetV2 (real, frozen), 160 px, 25 feature tokens",
            "num_image_tokens": model.num_image_tokens,
            "resampler": "qformer 8 queries, 2 layers, hidden 256, 4 heads", "projector": "linear",
            "llm": "SmolLM2-135M-Instruct (real, frozen)", "precision": "fp32", "device": str(device),
            "torch_threads": torch.get_num_threads(), "micro_batch_size": batch_size,
            "loader_batches": args.batches, "loader_warmup": args.warmup, "steps": args.steps, "skip": args.skip,
            "step": "forward + backward + clip_grad_norm + torch AdamW, one process, no DeepSpeed; "
                    "arms take turns step by step",
        },
        "per_sample_breakdown": breakdown,
        "step_prebuilt": prebuilt_stats,
        "workers": rows,
        "wall_s": time.perf_counter() - started,
    }
    path = save_json(report, "data_pipeline.json")

    print(f"\n{'arm':<11} {'first batch (s)':>15} {'loader (samples/s)':>18} {'loader / step':>13} "
          f"{'median step (s)':>15} {'train (samples/s)':>17} {'waiting for data':>16}")
    print(f"{'pre-built':<11} {'-':>15} {'-':>18} {'-':>13} {prebuilt_stats['median_step_s']:>15.3f} "
          f"{step_rate:>17.2f} {'-':>16}")
    for row in rows:
        train = row["train_with_loading"]
        label = f"{row['num_workers']} worker" + ("" if row["num_workers"] == 1 else "s")
        print(f"{label:<11} {row['startup_s']:>15.2f} "
              f"{row['loader_samples_per_s']:>18.1f} {row['loader_over_step']:>13.1f} {train['median_step_s']:>15.3f} "
              f"{train['samples_per_s']:>17.2f} {100 * train['wait_share']:>15.2f}%")
    print("\nper sample (ms, median / mean): " + ", ".join(
        f"{k} {v['median_ms']:.2f} / {v['mean_ms']:.2f}" for k, v in breakdown.items() if isinstance(v, dict)))
    print(f"\nwrote {path} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
