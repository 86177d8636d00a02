"""Batching: right-padding dataset items into tensors of equal length."""

from __future__ import annotations

from typing import Any

import torch

from mmtrain.data.templates import IGNORE_INDEX


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stacks dataset items into a batch, right-padding to the longest sequence.

    Args:
        batch: Items from VLMDataset.
        pad_token_id: Id written into padded ``input_ids`` positions.

    Returns:
        ``input_ids`` [B, T] (padded with ``pad_token_id``), ``labels`` [B, T]
        (padded with -100), ``image_mask`` [B, T] (padded with False),
        ``attention_mask`` [B, T] (1 on tokens, 0 on padding),
        ``pixel_values`` [B, C, H, W] and ``has_image`` [B] (bool).

    Raises:
        ValueError: The batch is empty.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    size = len(batch)
    longest = max(item["input_ids"].shape[0] for item in batch)
    input_ids = torch.full((size, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((size, longest), IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros((size, longest), dtype=torch.bool)
    attention_mask = torch.zeros((size, longest), dtype=torch.long)
    for row, item in enumerate(batch):
        length = item["input_ids"].shape[0]
        input_ids[row, :length] = item["input_ids"]
        labels[row, :length] = item["labels"]
        image_mask[row, :length] = item["image_mask"]
        attention_mask[row, :length] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "image_mask": image_mask,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "has_image": torch.tensor([bool(item["has_image"]) for item in batch], dtype=torch.bool),
    }


class Collator:
    """A picklable ``collate_fn`` for DataLoader workers, holding the pad token id."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id)
