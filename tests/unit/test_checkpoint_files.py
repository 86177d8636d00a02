"""Checkpoint discovery and atomic writes: incomplete checkpoints are never picked up."""

from __future__ import annotations

import pytest

from mmtrain.engine.checkpoint import complete_checkpoints, latest_checkpoint, resolve_resume
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

