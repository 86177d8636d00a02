"""Training-step throughput and model-FLOPs utilisation (MFU) of mmtrain on a GPU, bf16.

The VLM is BLIP-2/VPGTrans-shaped: a frozen ViT-B/16-sized tower (224 px, 196 patches), a trainable
Q-Former resampler (32 queries, 768 wide) and linear projector, and a frozen LLM built from a
`config.json` (random weights: the same FLOPs and memory as the pretrained ones). Arms: each LLM
config x each ZeRO stage, one process on one GPU, all through `python -m mmtrain.train`, so the
measured path is the product's (DeepSpeed engine, FusedAdam, SDPA or flash-attn attention).

    python benchmarks/bench_gpu_step.py --llm path/to/qwen2.5-1.5b,path/to/qwen2.5-0.5b \
        --tokenizer path/to/tokenizer_folder --out benchmarks/results/gpu_step.json

At LLaVA-1.5-7B's shapes (`--shape llava-1.5-7b`: CLIP ViT-L/14-336-shaped tower, 576 visual tokens,
LLaVA-1.5's MLP projector, a Llama-2-7B-shaped LLM at full depth, ~100 text tokens a sample, random
weights, no files needed), the arms are ZeRO-2 / ZeRO-3 x padded / packed, with `data.num_workers:
auto`, and the report adds frozen-aware MFU: LLM forward + input gradients 4 x params x tokens,
frozen tower forward 2 x params x patch tokens, trainable projector 6 x params x visual tokens.
The LLM's random weights are drawn once on the GPU and saved under the work folder; the arms load
them as a pretrained LLM (drawing them on the CPU from a config takes minutes):

    DS_ACCELERATOR=cuda python benchmarks/bench_gpu_step.py --shape llava-1.5-7b     # ~1 minute an arm

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
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Dense bf16 tensor-core peaks (TFLOP/s) of the SXM parts.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
# A tiny stand-in of the same structure, to check the script on a CPU.
TINY_SHAPE = ({**CLIP_L_336, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4},
              {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4})
SHAPES = {"llava-1.5-7b": (CLIP_L_336, LLAMA2_7B), "tiny": TINY_SHAPE}
VIT_B16 = {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "image_size": 224, "patch_size": 16}


def hf_config(config: dict):
    """A Hugging Face config object from a plain dict holding its `model_type`."""
    from transformers import AutoConfig

    params = dict(config)
    return AutoConfig.for_model(params.pop("model_type"), **params)


def non_embedding_parameters(config: dict) -> int:
    """Parameters of the LLM's decoder layers (what every token passes through), from its config."""
    from transformers import AutoModelForCausalLM

    import torch

    cfg = hf_config(config)
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


def train(cfg: dict, out: Path, timeout: int, result: dict) -> dict:
    """Run one arm's config through `python -m mmtrain.train`; `result` plus its wall time (or its error).

    The run's output goes to `out/train.log` as it comes, so an arm stopped at `timeout` still shows
    how far it got; a timeout is that arm's error, and the other arms still run.
    """
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.yaml").write_text(yaml.safe_dump(cfg))
    log = out / "train.log"
    started = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "mmtrain.train", str(out / "bench.yaml")], cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1",
                                     "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
                                stdout=sink, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    result = {**result, "wall_s": time.perf_counter() - started, "log": str(log)}
    if code != 0:
        ending = f"timed out after {timeout} s" if code is None else f"exited {code}"
        result["error"] = f"{ending}; the end of {log}:\n" + log.read_text(errors="replace")[-4000:]
    return result


def run_arm(workdir: Path, llm_dir: Path, tokenizer: Path, stage: str, args) -> dict:
    from mmtrain.data.synthetic import make_caption_dataset

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
    result = train(cfg, out, args.timeout, {"arm": name, "llm": llm_dir.name, "zero": stage})
    if "error" in result:
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


def module_parameters(config: dict) -> int:
    """Parameters of a Hugging Face model built from `config` (on the meta device: no memory)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(hf_config(config))
    return sum(p.numel() for p in model.parameters())


def shape_data(workdir: Path, image_size: int) -> tuple[Path, Path]:
    """256 generated pictures with ~16 to ~160 words of caption text each, and a word-level tokenizer."""
    from mmtrain.data.synthetic import make_caption_dataset, make_tiny_tokenizer

    data = workdir / "data"
    manifest = data / "long.jsonl"
    if not manifest.is_file():
        train = make_caption_dataset(data, num_images=256, image_size=image_size, seed=0)
        records = [json.loads(line) for line in Path(train).read_text().splitlines()]
        for i, record in enumerate(records):  # 2 to 20 repeats: ~16 to ~160 words, ~100 on average
            record["text"] = " ".join([record["text"]] * (2 + (7 * i) % 19))
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = workdir / "tokenizer"
    if not tokenizer.is_dir():
        make_tiny_tokenizer(manifest.read_text().splitlines(), tokenizer, vocab_size=512)
    return manifest, tokenizer


def random_llm_folder(workdir: Path, shape: str, config: dict, precision: str) -> Path:
    """The shape's LLM with random weights, saved once as a Hugging Face folder that the arms load as users
    load a pretrained LLM. Built on the GPU when there is one: drawing a 7B model's random weights on the
    CPU, as `model.llm.config` does, takes minutes of one core."""
    folder = workdir / f"llm-{shape}-{precision}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    from mmtrain.engine.placement import DTYPES

    started = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=DTYPES[precision])
    unfinished = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(unfinished, ignore_errors=True)
    model.save_pretrained(unfinished)
    unfinished.rename(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"random {shape} LLM saved to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def run_shape_arm(workdir: Path, shape: str, stage: str, packing: bool, args) -> dict:
    """One arm at a named shape through `python -m mmtrain.train`; frozen-aware MFU from its metrics."""
    vision, llm = SHAPES[shape]
    manifest, tokenizer = shape_data(workdir, vision["image_size"])
    llm_folder = random_llm_folder(workdir, shape, llm, args.precision)
    name = f"{shape}-{stage}-{'packed' if packing else 'padded'}"
    out = workdir / name
    sample_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 110
    rows = max(1, args.micro_batch * sample_tokens // args.pack_length)
    cfg = {
        "deepspeed": str(REPO / "ds_configs" / f"{stage}.json"), "output_dir": str(out), "max_steps": args.steps,
        "micro_batch_size": rows if packing else args.micro_batch, "precision": args.precision,
        "progress_bar": False, "log_every": 1, "seed": 0,
        "model": {"vision": {"config": vision, "feature_layer": -2, "drop_cls": True},
                  "resampler": {"kind": "identity"}, "projector": {"kind": "mlp"},
                  "llm": {"name_or_path": str(llm_folder), "tokenizer": str(tokenizer), "trainable": "frozen",
                          "attn_implementation": "auto"}},
        "data": {"train": str(manifest), "template": "plain", "num_workers": "auto", "packing": packing,
                 "max_length": args.pack_length if packing else 1024},
        "optim": {"lr": 2e-5, "warmup_steps": 2},
        "checkpoint": {"save_every": 0, "resume": "never"},
    }
    result = train(cfg, out, args.timeout, {"arm": name, "llm": shape, "zero": stage, "packing": packing})
    if "error" in result:
        return result
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "step_time_s" in r and r["step"] > args.skip]
    before = next(r for r in records if r["step"] == args.skip)
    step_time = statistics.median(r["step_time_s"] for r in steps)
    tokens = statistics.fmean(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    images = (steps[-1]["samples"] - before["samples"]) / len(steps)
    llm_params, tower_params = non_embedding_parameters(llm), module_parameters(vision)
    visual_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    projector_params = vision["hidden_size"] * llm["hidden_size"] + llm["hidden_size"] ** 2 + 2 * llm["hidden_size"]
    flops = (4 * llm_params * tokens + 2 * tower_params * images * (visual_tokens + 1)
             + 6 * projector_params * images * visual_tokens)
    rank0 = json.loads((out / "ranks" / "rank0.json").read_text())
    result.update({"step_time_s": step_time, "tokens_per_step": tokens, "images_per_step": images,
                   "tokens_per_s": tokens / step_time, "llm_non_embedding_params": llm_params,
                   "tower_params": tower_params, "llm_tflops_per_s": 4 * llm_params * tokens / step_time / 1e12,
                   "frozen_aware_tflops_per_s": flops / step_time / 1e12,
                   "padding_fraction": statistics.fmean(r["padding_fraction"] for r in steps),
                   "peak_cuda_mib": rank0.get("peak_cuda_mib"), "final_loss": records[-1].get("loss")})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", help="comma-separated LLM folders holding config.json")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a named model shape instead of --llm folders")
    parser.add_argument("--packing", default="off,on", help="with --shape: padded (off) and/or packed (on) arms")
    parser.add_argument("--pack-length", type=int, default=4096, help="with --shape: positions per packed row")
    parser.add_argument("--zero", default="zero2,zero3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_gpu_step")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_step.json")
    args = parser.parse_args()
    if not args.shape and not (args.llm and args.tokenizer):
        parser.error("give --shape, or --llm and --tokenizer")
    device, peak = peak_tflops()
    results = []
    if args.shape:
        arms = [(stage, packing == "on") for stage in args.zero.split(",") for packing in args.packing.split(",")]
    else:
        arms = [(Path(llm), stage) for llm in args.llm.split(",") for stage in args.zero.split(",")]
    for first, second in arms:
        if args.shape:
            result = run_shape_arm(args.workdir, args.shape, first, second, args)
        else:
            result = run_arm(args.workdir, first, args.tokenizer, second, args)
        if peak and "llm_tflops_per_s" in result:
            result["mfu_llm"] = result["llm_tflops_per_s"] / peak
            if "frozen_aware_tflops_per_s" in result:
                result["mfu_frozen_aware"] = result["frozen_aware_tflops_per_s"] / peak
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr, flush=True)
    header = (f"{'arm':<28} {'step s':>7} {'tok/step':>8} {'tok/s':>9} {'LLM TFLOP/s':>11} {'MFU (LLM / frozen-aware)':>24} "
              f"{'peak MiB':>9}")
    print(f"\n{device}, {args.precision}, micro-batch {args.micro_batch}\n{header}\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['arm']:<28} failed")
            continue
        mfu = f"{100 * r['mfu_llm']:.1f}%" if "mfu_llm" in r else "-"
        if "mfu_frozen_aware" in r:
            mfu += f" / {100 * r['mfu_frozen_aware']:.1f}%"
        mib = f"{r['peak_cuda_mib']:.0f}" if r.get("peak_cuda_mib") else "-"
        print(f"{r['arm']:<28} {r['step_time_s']:>7.3f} {r['tokens_per_step']:>8.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['llm_tflops_per_s']:>11.1f} {mfu:>24} {mib:>9}")
    import torch

    payload = {"device": device, "peak_bf16_tflops": peak, "torch": torch.__version__, "precision": args.precision,
               "micro_batch": args.micro_batch, "steps": args.steps, "skip": args.skip, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
