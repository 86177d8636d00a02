"""Shared set-up for the benchmarks: the real frozen LLM, images, and the run config they all use.

The LLM is the real SmolLM2-135M-Instruct (prepared offline by `python -m mmtrain.assets`). Until the
real-image assets land, images are generated captioned pictures at the tower's resolution; step
time does not depend on pixel content. The vision tower is a CLIP-style ViT built from a config
(no pretrained ViT exists offline); it is frozen, so its weights do not change the work done.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def bench_config(workdir: Path, llm_dir: Path, ds_json: str = "zero2.json", max_steps: int = 20,
                 micro_batch_size: int = 4) -> dict[str, Any]:
    """The run config shared by every arm of a benchmark."""
    from mmtrain.data.synthetic import make_caption_dataset

    data = workdir / "data"
    if not (data / "train.jsonl").is_file():
        make_caption_dataset(data, num_images=128, image_size=64, seed=0)
    return {
        "deepspeed": str(REPO / "ds_configs" / ds_json),
        "output_dir": str(workdir / "run"),
        "max_steps": max_steps,
        "micro_batch_size": micro_batch_size,
        "precision": "fp32",
        "progress_bar": False,
        "seed": 0,
        "model": {
            "vision": {"config": {"model_type": "clip_vision_model", "hidden_size": 192, "intermediate_size": 768,
                                  "num_hidden_layers": 4, "num_attention_heads": 3, "image_size": 64,
                                  "patch_size": 8}},
            "resampler": {"kind": "qformer", "num_queries": 16, "num_layers": 2, "hidden_size": 192, "num_heads": 4},
            "projector": {"kind": "linear"},
            "llm": {"name_or_path": str(llm_dir), "trainable": "frozen"},
        },
        "data": {"train": str(data / "train.jsonl"), "max_length": 64, "template": "plain"},
        "optim": {"lr": 1e-4, "warmup_steps": 2, "weight_decay": 0.0},
        "checkpoint": {"save_every": 0, "resume": "never"},
    }


def write_yaml(cfg: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def summarize(times: list[float], skip: int) -> dict[str, float]:
    kept = times[skip:]
    return {"median_s": statistics.median(kept), "p25_s": statistics.quantiles(kept, n=4)[0],
            "mean_s": statistics.fmean(kept), "n": len(kept)}


def environment() -> dict[str, Any]:
    import os

    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save_json(obj: Any, name: str) -> Path:
    from mmtrain.utils.io import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    atomic_write_json(path, obj)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def recipe_stage_folders(recipe: Path, output_dir: Path) -> dict[str, Path]:
    """Stage name -> its folder (`NN-name`) under `output_dir`, in the recipe's order."""
    stages = yaml.safe_load(Path(recipe).read_text())["stages"]
    return {s["name"]: Path(output_dir) / f"{i:02d}-{s['name']}" for i, s in enumerate(stages, start=1)}


def trainable_parameters(folder: Path) -> dict[str, Any]:
    """Trainable parameter counts of a stage's saved config, counted on the meta device."""
    from mmtrain.config import load_config
    from mmtrain.models.counting import count_parameters

    counts = count_parameters(load_config(Path(folder) / "config.yaml").model)
    total = next(r for r in counts["components"] if r["component"] == "total")
    return {"trainable": total["trainable"], "by_kind": counts["trainable_by_kind"]}


def training_record(folder: Path) -> dict[str, Any]:
    """Steps, final train loss, median step time (the first logged step, with warm-up, left out),
    compute seconds and the training process's peak RSS of a finished stage."""
    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    times = [r["step_time_s"] for r in train[1:]]
    rank0 = json.loads((Path(folder) / "ranks" / "rank0.json").read_text())
    return {"steps": train[-1]["step"], "final_train_loss": train[-1]["loss"],
            "step_time_s": statistics.median(times), "compute_s": train[-1].get("compute_s"),
            "peak_rss_mib": rank0.get("peak_rss_mib")}


def run_mmtrain(args: list[str]) -> None:
    """`python -m mmtrain ARGS` from the repository root; exits naming the command if it fails."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print("==> mmtrain " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"mmtrain {' '.join(args)} failed ({proc.returncode})")


def train_arm(cfg: dict[str, Any], folder: Path, timeout: int = 3600) -> tuple[list[dict[str, Any]], str]:
    """Train one benchmark arm (`python -m mmtrain.train`) unless `folder` already holds its finished run
    (benchmarks resume arm by arm); returns its training records and, when it ran, its log."""
    import os
    import subprocess
    import sys

    metrics = Path(folder) / "run" / "metrics.jsonl"
    done = Path(folder) / "done"
    if not done.is_file():
        cfg = {**cfg, "output_dir": str(Path(folder) / "run")}
        config = write_yaml(cfg, Path(folder) / "config.yaml")
        print(f"==> train {config}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(config)], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout)
        (Path(folder) / "train.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"arm {folder} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        done.write_text("")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], (Path(folder) / "train.log").read_text()
