"""Entry points and bad inputs end to end: torchrun, a bare single process, the CLI, the ZeRO-3 text-only case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, launch, tiny_config, write_config


def _mixed_manifest(assets, path: Path) -> Path:
    """Even lines text-only, odd lines with an image: with shuffle off, rank 0 only ever sees text."""
    captions = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()]
    lines = []
    for i, rec in enumerate(captions[:16]):
        image = str(Path(assets["train"]).parent / rec["image"]) if i % 2 else None
        human = "<image>\nWhat is shown?" if image else "Name a colour."
        lines.append(json.dumps({"image": image, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": rec["text"]}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_zero3_text_only_rank_does_not_hang(tiny_assets, tmp_path):
    manifest = _mixed_manifest(tiny_assets, tmp_path / "mixed.jsonl")
    cfg = tiny_config(tiny_assets, tmp_path / "run", deepspeed=str(REPO / "ds_configs" / "zero3.json"),
                      micro_batch_size=2, max_steps=4, collective_timeout_s=120,
                      **{"data.train": str(manifest), "data.shuffle": False, "data.template": "chat"})
    path = write_config(cfg, tmp_path / "config.yaml")
    # Under the torchrun launcher; the collective timeout turns a hang into a failure.
    launch(["-m", "mmtrain.train", str(path)], nprocs=2, launcher="torchrun", timeout=300)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3


def test_single_process_skips_and_records_bad_samples(tiny_assets, tmp_path):
    captions = Path(tiny_assets["train"]).read_text().splitlines()
    folder = Path(tiny_assets["train"]).parent
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    bad = [json.dumps({"image": str(folder / "images" / "nope.png"), "text": "a missing picture."}),
           json.dumps({"image": str(broken), "text": "a corrupt picture."})]
    good = [json.dumps({**json.loads(c), "image": str(folder / json.loads(c)["image"])}) for c in captions[:14]]
    manifest = tmp_path / "with_bad.jsonl"
    manifest.write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    cfg = tiny_config(tiny_assets, tmp_path / "run", max_steps=4, **{"data.train": str(manifest), "data.bad_samples": "skip"})
    path = write_config(cfg, tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {(s["line"], s["manifest"]) for s in skipped} == {(4, str(manifest)), (5, str(manifest))}
    assert any("not found" in s["reason"] for s in skipped)
    assert "skipped" in proc.stderr
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["launcher"] == "single-process" and info["attn_implementation"] == "sdpa"


def test_bad_sample_error_names_manifest_line_and_reason(tiny_assets, tmp_path):
    folder = Path(tiny_assets["train"]).parent
    captions = Path(tiny_assets["train"]).read_text().splitlines()
    good = [json.dumps({**json.loads(c), "image": str(folder / json.loads(c)["image"])}) for c in captions[:8]]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(good[:1] + [json.dumps({"image": str(folder / "gone.png"), "text": "x."})] + good[1:]) + "\n")
    cfg = tiny_config(tiny_assets, tmp_path / "run", max_steps=2, **{"data.train": str(manifest), "data.shuffle": False})
    path = write_config(cfg, tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert f"error: {manifest}:2:" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_cli_unknown_key_names_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\noptim:\n  learning_rate: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "train", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optim.learning_rate" in proc.stderr and "lr" in proc.stderr
    cfg.write_text("max_steps: 3\n")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(cfg), "--set", "precision=fp8"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "precision" in proc.stderr and "bf16" in proc.stderr
