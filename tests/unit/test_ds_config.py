"""DeepSpeed JSON "auto" filling from the run config: one source of truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtrain.config import load_config
from mmtrain.engine.ds_config import DeepSpeedConfigError, fill_ds_config, load_ds_json, zero_stage

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3),
                                         ("zero3_param_offload.json", 3)])
def test_shipped_configs_fill_completely(name, stage):
    cfg = load_config(None, ["micro_batch_size=3", "grad_accum_steps=2", "grad_clip=0.5", "precision=bf16",
                             "optim.lr=2e-4", "optim.weight_decay=0.05"])
    ds = fill_ds_config(load_ds_json(REPO / "ds_configs" / name), cfg, world_size=4, hidden_size=64)
    assert zero_stage(ds) == stage
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    params = ds["optimizer"]["params"]
    assert params["lr"] == 2e-4 and params["weight_decay"] == 0.05 and params["betas"] == [0.9, 0.999]
    assert params["torch_adam"] is ("offload" not in name)
    assert "auto" not in json.dumps(ds)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640


def test_explicit_value_that_disagrees_is_an_error():
    ds = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}
    with pytest.raises(DeepSpeedConfigError, match="train_micro_batch_size_per_gpu.*micro_batch_size"):
        fill_ds_config(ds, load_config(None, ["micro_batch_size=4"]), 1, 64, source="my.json")


def test_explicit_value_that_agrees_is_fine():
    ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    assert fill_ds_config(ds, load_config(None, ["micro_batch_size=4"]), 1, 64)["train_micro_batch_size_per_gpu"] == 4


def test_unknown_auto_and_scheduler_block_are_errors():
    cfg = load_config(None)
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.sub_group_size"):
        fill_ds_config({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, cfg, 1, 64)
    with pytest.raises(DeepSpeedConfigError, match="scheduler"):
        fill_ds_config({"scheduler": {"type": "WarmupLR"}}, cfg, 1, 64)


def test_unreadable_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(DeepSpeedConfigError, match=r"bad.json:3"):
        load_ds_json(bad)
    with pytest.raises(DeepSpeedConfigError, match="no such file"):
        load_ds_json(tmp_path / "none.json")
