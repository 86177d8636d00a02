"""LLaVA's own data files (a JSON array of {id, image, conversations}) train, evaluate and check without
conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, launch, tiny_config, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def llava_json(tiny_assets, tmp_path) -> Path:
    """The tiny captions as LLaVA records in another folder, images named under the data folder."""
    records = []
    for line in Path(tiny_assets["train"]).read_text().splitlines():
        record = json.loads(line)
        records.append({"id": record["id"], "image": record["image"], "model": "synthetic", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": record["text"]}]})
    path = tmp_path / "annotations" / "llava_tiny.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records, indent=1))
    return path


def test_a_llava_json_array_trains_and_checks(tiny_assets, llava_json, tmp_path):
    image_root = str(Path(tiny_assets["train"]).parent)
    cfg = tiny_config(tiny_assets, tmp_path / "run", max_steps=2,
                      **{"data.train": str(llava_json), "data.image_root": image_root, "checkpoint.save_every": 0})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = launch(["-m", "mmtrain.train", str(write_config(cfg, tmp_path / "config.yaml"))], nprocs=1)
    assert "keys mmtrain does not use are ignored: model" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    evaluated = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(tmp_path / "run"), "--data",
                                str(llava_json), "--max-samples", "8", "--generate", "2", "--no-ablations",
                                "--out", str(tmp_path / "eval.json")], cwd=REPO, capture_output=True, text=True,
                               env=env)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["samples"] == 8
    check = subprocess.run([sys.executable, "-m", "mmtrain", "data", "check", str(llava_json), "--image-root",
                            image_root], cwd=REPO, capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    missing = subprocess.run([sys.executable, "-m", "mmtrain", "data", "check", str(llava_json)], cwd=REPO,
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "llava_tiny.json:0:" in missing.stdout  # images not next to the file
