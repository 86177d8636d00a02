"""A LLaVA-shaped run on the real assets (DINOv2-S, SmolLM2-135M, Tux Paint captions, ChatML), exported:
transformers' LLaVA captions real photos exactly as mmtrain does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
ASSETS = ("tuxpaint", "dinov2-small", "smollm2-135m")


def mmtrain(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_real_llava_shaped_run_captions_identically_after_export(tmp_path):
    from mmtrain.assets import prepare
    from mmtrain.assets.registry import resolve_asset_reference

    for name in ASSETS:
        prepare(name)
    cfg = {"deepspeed": str(REPO / "ds_configs" / "zero2.json"), "output_dir": str(tmp_path / "run"), "seed": 0,
           "precision": "fp32", "max_steps": 8, "micro_batch_size": 4, "progress_bar": False,
           "model": {"vision": {"kind": "hf", "name_or_path": "asset:dinov2-small", "feature_layer": -4,
                                "drop_cls": True},
                     "resampler": {"kind": "identity"}, "projector": {"kind": "mlp"},
                     "llm": {"name_or_path": "asset:smollm2-135m", "trainable": "frozen"}},
           "data": {"train": "asset:tuxpaint/train.jsonl", "template": "chatml", "max_length": 320},
           "optim": {"lr": 1e-3, "warmup_steps": 2}, "checkpoint": {"save_every": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    mmtrain("train", str(tmp_path / "config.yaml"))
    mmtrain("export", str(tmp_path / "run"), "--out", str(tmp_path / "export"))
    test = Path(resolve_asset_reference("asset:tuxpaint/test.jsonl"))
    photos = [str(test.parent / json.loads(line)["image"]) for line in test.read_text().splitlines()[:3]]
    answers = {}
    for name, target in (("run", tmp_path / "run"), ("export", tmp_path / "export")):
        out = tmp_path / f"{name}.jsonl"
        mmtrain("generate", str(target), "--image", *photos, "--out", str(out), "--max-new-tokens", "12")
        answers[name] = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert len(answers["run"]) == 3 and all(answers["run"])
    assert answers["export"] == answers["run"]
