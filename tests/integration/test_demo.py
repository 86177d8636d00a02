"""The demo on the real assets: a frozen SmolLM2-135M learns to caption real photos through a
pretrained DINOv2-S ViT, and the picture really helps (a shortened `configs/demo.yaml`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
DEMO_ASSETS = ("tuxpaint", "dinov2-small", "smollm2-135m")


def test_demo_learns_to_use_the_image(tmp_path):
    from mmtrain.assets import prepare

    for name in DEMO_ASSETS:  # the shared cache: prepared once per machine, hash-checked
        prepare(name)
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mmtrain", "run", str(REPO / "configs" / "demo.yaml"), "--output-dir", str(out),
           "--set", "max_steps=150", "eval_every=0", "progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "01-caption" / "eval" / "test.json").read_text())
    loss = result["loss"]
    # Held-out photos: the caption loss with the right picture beats the same frozen LLM with no
    # picture and with another test photo's picture, by a clear margin.
    assert loss["loss"] < loss["loss_no_image"] - 0.5, loss
    assert loss["loss"] < loss["loss_other_image"] - 0.2, loss
    captions = result["captions"]
    assert captions["images"] == len({e["image"] for e in captions["examples"]}) > 50
    assert captions["cider"] > 0.05
    assert sum(1 for e in captions["examples"] if e["prediction"]) > 0.9 * captions["images"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done"]
