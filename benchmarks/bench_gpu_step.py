"""Training-step throughput and model-FLOPs utilisation (MFU) of mmtrain on a GPU, bf16.

The VLM is BLIP-2/VPGTrans-shaped: a frozen ViT-B/16-sized tower (224 px, 196 patches), a trainable
Q-Former resampler (32 queries, 768 wide) and linear projector, and a frozen LLM built from a
`config.json` (random weights: the same FLOPs and memory as the pretrained ones). Arms: each LLM
config x each ZeRO stage, one process on one GPU, all through `python -m mmtrain.train`, so the
measured path is the product's (DeepSpeed engine, FusedAdam, SDPA or flash-attn attention).

    python benchmarks/bench_gpu_step.py --llm path/to/qwen2.5-1.5b,path/to/qwen2.5-0.5b \
        --tokenizer path/to/tokenizer_folder --out benchmarks/results/gpu_step.json

Step time = median of `step_time_s` over the logged steps after `--skip`. MFU counts the frozen
LLM's matrix work only, 4 x non-embedding parameters x tokens per step (forward 2N, backward 2N for
the input gradients; no weight gradients since it is frozen), against the GPU's dense bf16 peak;
the tower and resampler add a few percent that are not counted. A per-arm failure is recorded and
the other arms still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Dense bf16 tensor-core peaks (TFLOP/s) of the SXM parts.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
VIT_B16 = {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "image_size": 224, "patch_size": 16}


def non_embedding_parameters(config: dict) -> int:
    """Parameters of the LLM's decoder layers (what every token passes through), from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    params = dict(config)
    cfg = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    return int(total)


def peak_tflops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run_arm(workdir: Path, llm_dir: Path, tokenizer: Path, stage: str, args) -> dict:
    from mmtrain.data.synthetic import make_caption_dataset

    import yaml

    data = workdir / "data"
    if not (data / "train.jsonl").is_file():
        make_caption_dataset(data, num_images=256, image_size=224, seed=0)
    llm_config = json.loads((llm_dir / "config.json").read_text())
    keep = {k: v for k, v in llm_config.items() if not k.startswith(("_", "architectures", "transformers_version",
                                                                      "torch_dtype", "dtype"))}
    name = f"{llm_dir.name}-{stage}"
    out = workdir / name
    cfg = {
        "deepspeed": str(REPO / "ds_configs" / f"{stage}.json"), "output_dir": str(out), "max_steps": args.steps,
        "micro_batch_size": args.micro_batch, "precision": args.precision, "progress_bar": False, "log_every": 1,
        "seed": 0,
        "model": {"vision": {"config": VIT_B16},
                  "resampler": {"kind": "qformer", "num_queries": 32, "num_layers": 2, "hidden_size": 768,
                                "num_heads": 12},
                  "projector": {"kind": "linear"},
                  "llm": {"config": keep, "tokenizer": str(tokenizer), "trainable": "frozen"}},
        "data": {"train": str(data / "train.jsonl"), "max_length": 128, "template": "plain"},
        "optim": {"lr": 1e-4, "warmup_steps": 2},
        "checkpoint": {"save_every": 0, "resume": "never"},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.yaml").write_text(yaml.safe_dump(cfg))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(out / "bench.yaml")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
                          capture_output=True, text=True, timeout=args.timeout)
    result = {"arm": name, "llm": llm_dir.name, "zero": stage, "wall_s": time.perf_counter() - started}
    if proc.returncode != 0:
        result["error"] = (proc.stdout[-1500:] + proc.stderr[-3000:])
        return result
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "step_time_s" in r and r["step"] > args.skip]
    times = [r["step_time_s"] for r in steps]
    tokens = [r["tokens_per_s"] * r["step_time_s"] for r in steps]
    rank0 = json.loads((out / "ranks" / "rank0.json").read_text())
    n = non_embedding_parameters(keep)
    step_time = statistics.median(times)
    tokens_per_step = statistics.mean(tokens)
    result.update({"step_time_s": step_time, "tokens_per_step": tokens_per_step,
                   "tokens_per_s": tokens_per_step / step_time, "llm_non_embedding_params": n,
                   "llm_tflops_per_s": 4 * n * tokens_per_step / step_time / 1e12,
                   "peak_cuda_mib": rank0.get("peak_cuda_mib"), "final_loss": records[-1].get("loss")})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", required=True, help="comma-separated LLM folders holding config.json")
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--zero", default="zero2,zero3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_gpu_step")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_step.json")
    args = parser.parse_args()
    device, peak = peak_tflops()
    results = []
    for llm in [Path(p) for p in args.llm.split(",")]:
        for stage in args.zero.split(","):
            result = run_arm(args.workdir, llm, args.tokenizer, stage, args)
            if peak and "llm_tflops_per_s" in result:
                result["mfu_llm"] = result["llm_tflops_per_s"] / peak
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
            if "error" in result:
                print(result["error"], file=sys.stderr, flush=True)
    header = f"{'arm':<28} {'step s':>7} {'tok/step':>8} {'tok/s':>9} {'LLM TFLOP/s':>11} {'MFU':>6} {'peak MiB':>9}"
    print(f"\n{device}, {args.precision}, micro-batch {args.micro_batch}\n{header}\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['arm']:<28} failed")
            continue
        mfu = f"{100 * r['mfu_llm']:.1f}%" if "mfu_llm" in r else "-"
        mib = f"{r['peak_cuda_mib']:.0f}" if r.get("peak_cuda_mib") else "-"
        print(f"{r['arm']:<28} {r['step_time_s']:>7.3f} {r['tokens_per_step']:>8.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['llm_tflops_per_s']:>11.1f} {mfu:>6} {mib:>9}")
    import torch

    payload = {"device": device, "peak_bf16_tflops": peak, "torch": torch.__version__, "precision": args.precision,
               "micro_batch": args.micro_batch, "steps": args.steps, "skip": args.skip, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
