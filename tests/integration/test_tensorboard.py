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


def _train(path, *overrides):
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path), *overrides], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_tensorboard_scalars_equal_the_metrics_file(tiny_assets, tmp_path):
    """Two invocations (stopped at step 4, then resumed to 6): each step once, as in metrics.jsonl."""
    run = tmp_path / "run"
    cfg = tiny_config(tiny_assets, run, max_steps=6, eval_every=3, log_every=1,
                      **{"logging.tensorboard": True, "data.val": str(tiny_assets["val"])})
    path = write_config(cfg, tmp_path / "config.yaml")
    _train(path, "--set", "stop_after_steps=4")
    _train(path)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in records if "loss" in r}
    val = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(train) == list(range(1, 7)) and sorted(val) == [3, 4, 6]  # each invocation validates at its end

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "val/val_loss"} <= set(scalars)
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == sorted(train), steps  # every step once, across the two invocations
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    for step, record in train.items():  # TensorBoard stores float32
        assert abs(losses[step] - record["loss"]) <= 1e-6 * max(1.0, abs(record["loss"]))
    val_losses = {e.step: e.value for e in events.Scalars("val/val_loss")}
    assert sorted(val_losses) == sorted(val)
    for step, record in val.items():
        assert abs(val_losses[step] - record["val_loss"]) <= 1e-6 * max(1.0, abs(record["val_loss"]))

    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines() if line.strip()]
    kinds = [r["event"] for r in ledger]
    assert kinds.count("process_start") == 2 and kinds[-1] == "process_end" and "checkpoint" in kinds
    ends = [r for r in ledger if r["event"] == "process_end"]
    assert [(r["outcome"], r["step_start"], r["step_end"]) for r in ends] == [("stopped", 0, 4), ("completed", 4, 6)]
    assert all(r["flops"] > 0 for r in ends)


def test_tensorboard_is_off_by_default(tiny_assets, tmp_path):
    run = tmp_path / "run"
    _train(write_config(tiny_config(tiny_assets, run, max_steps=1), tmp_path / "config.yaml"))
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists()
