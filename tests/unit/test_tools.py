"""tools/show_checkpoint.py on a checkpoint folder and on a run folder."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from tools.show_checkpoint import describe, main


def test_show_checkpoint_lists_tensors_and_step(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "step_00000007"
    (ckpt / "ds").mkdir(parents=True)
    save_file({"projector.weight": torch.zeros(4, 3), "projector.bias": torch.zeros(4)}, str(ckpt / "trainable.safetensors"))
    (ckpt / "meta.json").write_text(json.dumps({"step": 7, "samples_seen": 28, "tokens_seen": 300}))
    text = describe(tmp_path)
    assert "step 7" in text and "projector.weight" in text and "(4, 3)" in text and "16 trainable parameters" in text
    assert main([str(tmp_path / "nothing")]) == 1
    assert "neither a complete checkpoint" in capsys.readouterr().err
