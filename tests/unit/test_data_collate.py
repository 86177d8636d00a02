"""Tests for mmtrain.data.collate: padding and stacking."""

from __future__ import annotations

import pickle

import pytest
import torch

from mmtrain.data.collate import Collator, collate

PAD = 7


def _item(length: int, has_image: bool, fill: float) -> dict[str, object]:
    return {
        "input_ids": torch.arange(10, 10 + length),
        "labels": torch.arange(20, 20 + length),
        "image_mask": torch.tensor([True] * 2 + [False] * (length - 2)),
        "pixel_values": torch.full((3, 4, 5), fill),
        "has_image": has_image,
    }


def test_right_pads_and_stacks() -> None:
    batch = collate([_item(3, True, 1.0), _item(5, False, 0.0)], PAD)
    assert set(batch) == {"input_ids", "labels", "image_mask", "attention_mask", "pixel_values", "has_image"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, PAD, PAD], [10, 11, 12, 13, 14]]
    assert batch["labels"].tolist() == [[20, 21, 22, -100, -100], [20, 21, 22, 23, 24]]
    assert batch["image_mask"].tolist() == [[True, True, False, False, False], [True, True, False, False, False]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["image_mask"].dtype == torch.bool
    assert batch["pixel_values"].shape == (2, 3, 4, 5)
    assert batch["pixel_values"][0].eq(1).all() and batch["pixel_values"][1].eq(0).all()
    assert batch["has_image"].dtype == torch.bool and batch["has_image"].tolist() == [True, False]


def test_equal_lengths_need_no_padding() -> None:
    batch = collate([_item(4, True, 0.0)] * 3, PAD)
    assert batch["input_ids"].shape == (3, 4)
    assert batch["attention_mask"].eq(1).all()


def test_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([], PAD)


def test_collator_is_picklable() -> None:
    collator = pickle.loads(pickle.dumps(Collator(PAD)))
    assert collator.pad_token_id == PAD
    assert collator([_item(2, True, 0.0), _item(3, True, 0.0)])["input_ids"][0, 2] == PAD
