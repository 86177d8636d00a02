"""Per-component LR groups and the warm-up + cosine/constant schedule."""

from __future__ import annotations

import math

import pytest
from torch import nn

from mmtrain.config import OptimConfig
from mmtrain.engine.optim import build_param_groups, lr_factor


class FakeVLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(2, 2)
        self.resampler = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
        self.projector = nn.Linear(3, 4)
        self.llm = nn.Linear(4, 4)
        self.vision.requires_grad_(False)
        self.llm.requires_grad_(False)


def test_groups_per_component_with_multiplier_and_decay_split():
    cfg = OptimConfig(lr=1e-4, weight_decay=0.05, lr_multipliers={"projector": 5.0})
    groups = build_param_groups(FakeVLM(), cfg)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"resampler", "resampler/no_decay", "projector", "projector/no_decay"}
    assert by_name["projector"]["lr"] == 5 * by_name["resampler"]["lr"] == 5e-4
    assert by_name["projector/no_decay"]["weight_decay"] == 0.0 and by_name["projector"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == 6  # frozen vision/llm absent


def test_unknown_multiplier_and_nothing_to_train():
    with pytest.raises(ValueError, match="unknown component.*projecter"):
        build_param_groups(FakeVLM(), OptimConfig(lr_multipliers={"projecter": 5.0}))
    model = FakeVLM()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_param_groups(model, OptimConfig())


def test_schedule_values():
    cfg = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg, 14) == pytest.approx(1.0)
    assert lr_factor(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(14, cfg, 14) == pytest.approx(0.1)
    constant = OptimConfig(warmup_steps=0, schedule="constant")
    assert {lr_factor(s, constant, 10) for s in range(10)} == {1.0}
