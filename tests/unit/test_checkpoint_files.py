"""Checkpoint discovery and atomic writes: incomplete checkpoints are never picked up."""

from __future__ import annotations

import pytest

from mmtrain.engine.checkpoint import complete_checkpoints, latest_checkpoint, remove_unfinished, resolve_resume
from mmtrain.engine.disk import human_bytes
from mmtrain.engine.metrics import MetricsLog, read_metrics
from mmtrain.utils.io import atomic_write_text


def make(root, name, meta=True):
    path = root / "checkpoints" / name
    (path / "ds").mkdir(parents=True)
    if meta:
        (path / "meta.json").write_text("{}")
    return path


def test_latest_skips_tmp_and_incomplete(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make(tmp_path, "step_00000004")
    make(tmp_path, "step_00000012")
    make(tmp_path, "step_00000016.tmp")
    make(tmp_path, "step_00000020", meta=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000012"]
    assert resolve_resume("auto", tmp_path).name == "step_00000012"
    assert resolve_resume("never", tmp_path) is None


def test_explicit_resume_must_be_complete(tmp_path):
    bad = make(tmp_path, "step_00000016.tmp", meta=False)
    with pytest.raises(FileNotFoundError, match="not a complete mmtrain checkpoint"):
        resolve_resume(str(bad), tmp_path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]



def test_unfinished_folders_are_cleared_and_complete_ones_kept(tmp_path):
    make(tmp_path, "step_00000004")
    make(tmp_path, "step_00000008.tmp", meta=False)
    make(tmp_path, "step_00000002.deleting")
    remove_unfinished(tmp_path / "checkpoints")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]


def test_resume_truncation_drops_later_records_and_cut_lines(tmp_path):
    lines = ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}', '{"step": 2, "val_loss": 1.7}',
             '{"step": 3, "loss": 1.2}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2, 3]
    MetricsLog(tmp_path, enabled=True).truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"


def test_sizes_read_in_binary_units():
    assert [human_bytes(n) for n in (512, 496_947, 3 << 30)] == ["512 B", "485.3 KiB", "3.0 GiB"]
