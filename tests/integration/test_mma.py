"""MMA end to end: mixed text-only/image batches on two ZeRO-3 ranks under the real launcher, router
adapters in the vision tower and the LLM; a bitsandbytes 4-bit / 8-bit frozen LLM training adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, launch, tiny_config, write_config

pytestmark = pytest.mark.slow
HARNESS = str(REPO / "tests" / "launch" / "train_and_dump.py")
ADAPTERS = {"model.llm.adapter": {"kind": "router"}, "model.llm.trainable": "adapters",
            "model.vision.adapter": {"kind": "router"}, "model.vision.trainable": "adapters",
            "data.no_image_text": "Image: N/A\n"}


def text_only_manifest(tiny_assets, path: Path, count: int) -> Path:
    captions = [json.loads(line)["text"] for line in tiny_assets["train"].read_text().splitlines()[:count]]
    path.write_text("".join(json.dumps({"image": None, "conversations": [
        {"from": "human", "value": "Say something."}, {"from": "gpt", "value": c}]}) + "\n" for c in captions))
    return path


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def mixed_zero3_run(tiny_assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mma_zero3")
    text = text_only_manifest(tiny_assets, root / "text.jsonl", 24)
    # 24 text-only and 8 image samples, 2 per rank per step: most steps hand some rank a batch
    # without any image while the other has one.
    cfg = tiny_config(tiny_assets, root / "run", **ADAPTERS, **{
        "deepspeed": str(REPO / "ds_configs" / "zero3.json"), "max_steps": 8, "micro_batch_size": 2,
        "data.train": [str(text), str(tiny_assets["train"])], "data.train_samples": 32,
        "optim.lr": 1e-2})
    launch([HARNESS, str(write_config(cfg, root / "config.yaml"))], nprocs=2)
    return root / "run"


def test_mixed_modality_zero3_run_trains_only_the_adapters(mixed_zero3_run):
    assert len(losses(mixed_zero3_run)) == 8 and all(torch.isfinite(torch.tensor(losses(mixed_zero3_run))))
    initial = load_file(str(mixed_zero3_run / "dump" / "initial.safetensors"))
    final = load_file(str(mixed_zero3_run / "dump" / "final.safetensors"))
    changed = {n for n in final if not torch.equal(initial[n], final[n])}
    frozen = [n for n in final if n.startswith(("llm.", "vision.")) and "mma_adapter" not in n
              and not n.startswith("llm.modality.")]
    assert frozen and not changed & set(frozen)
    assert any(n.startswith("vision.") and ".mma_adapter.up" in n for n in changed)
    assert any(n.startswith("llm.") and ".mma_adapter.up_alt" in n for n in changed)
    assert "llm.modality.embedding.weight" in changed
    for rank in range(2):
        report = json.loads((mixed_zero3_run / "ranks" / f"rank{rank}.json").read_text())
        llm = report["parameters"]["llm"]
        assert llm["local_numel"] < 0.6 * llm["numel"], llm  # ZeRO-3 really partitioned the LLM


def test_mma_checkpoint_evaluates_with_generation(mixed_zero3_run, tiny_assets):
    out = mixed_zero3_run / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(mixed_zero3_run), "--data",
                           str(tiny_assets["val"]), "--max-samples", "6", "--generate", "3", "--out", str(out),
                           "--text", str(tiny_assets["train"])],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["loss"]["loss"] > 0 and result["loss"]["loss_no_image"] > 0
    assert len(result["captions"]["examples"]) == 3 and result["text"]["ppl"] > 1


@pytest.mark.parametrize("bits, optimizer", [("4bit", "adamw8bit"), ("8bit", "adamw")])
def test_quantised_frozen_llm_trains_adapters_with_falling_loss(tiny_assets, tmp_path, bits, optimizer):
    cfg = tiny_config(tiny_assets, tmp_path / "run", **{
        "model.llm.adapter": {"kind": "router"}, "model.llm.trainable": "adapters", "model.llm.quantization": bits,
        "optim.name": optimizer, "optim.lr": 1e-2, "max_steps": 12, "log_every": 1, "checkpoint.save_every": 0,
        # validation mid-run: eval-mode passes must leave the quantised layers trainable-through
        "data.val": str(tiny_assets["val"]), "data.val_samples": 8, "eval_every": 4})
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(write_config(cfg, tmp_path / "c.yaml"))],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curve = losses(tmp_path / "run")
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.05, curve
    trained = load_file(str(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1] / "trainable.safetensors"))
    llm = [n for n in trained if n.startswith("llm.")]
    assert llm and all(".mma_adapter." in n or n.startswith("llm.modality.") for n in llm)


def test_quantisation_is_refused_under_zero3(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path / "run", **{
        "deepspeed": str(REPO / "ds_configs" / "zero3.json"), "model.llm.quantization": "4bit"})
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(write_config(cfg, tmp_path / "c.yaml"))],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "ZeRO-3 cannot partition bitsandbytes-quantised weights" in proc.stderr
