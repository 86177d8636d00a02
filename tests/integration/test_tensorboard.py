"""`logging.tensorboard: true`: the loop's events reach TensorBoard with the numbers of metrics.jsonl.

One single-process run (`python -m mmtrain.train`) with validation; the event files under
`<run>/tensorboard/` are read back with TensorBoard's own reader. The same run shows the cost
ledger (a listener attached by the command, not by the engine) still receives its records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, tiny_config, write_config


def test_tensorboard_scalars_equal_the_metrics_file(tiny_assets, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_assets, run, max_steps=6, eval_every=3, log_every=1,
                      **{"logging.tensorboard": True, "data.val": str(tiny_assets["val"])})
    path = write_config(cfg, tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in records if "loss" in r}
    val = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(train) == list(range(1, 7)) and sorted(val) == [3, 6]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "val/val_loss"} <= set(scalars)
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == sorted(train)
    for step, record in train.items():  # TensorBoard stores float32
        assert abs(losses[step] - record["loss"]) <= 1e-6 * max(1.0, abs(record["loss"]))
    val_losses = {e.step: e.value for e in events.Scalars("val/val_loss")}
    assert {s: round(v, 5) for s, v in val_losses.items()} == {s: round(r["val_loss"], 5) for s, r in val.items()}

    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines() if line.strip()]
    kinds = [r["event"] for r in ledger]
    assert kinds[0] == "process_start" and kinds[-1] == "process_end" and "checkpoint" in kinds
    end = ledger[-1]
    assert end["outcome"] == "completed" and end["steps"] == 6 and end["flops"] > 0


def test_tensorboard_is_off_by_default(tiny_assets, tmp_path):
    run = tmp_path / "run"
    path = write_config(tiny_config(tiny_assets, run, max_steps=1), tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists()
