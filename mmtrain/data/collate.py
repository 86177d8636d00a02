"""Batching: right-padding dataset items into tensors of equal length, or packing them into rows
(several samples per row, see `mmtrain.data.packing`)."""

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
        **image_inputs(batch),
        "has_image": torch.tensor([bool(item["has_image"]) for item in batch], dtype=torch.bool),
    }


def image_inputs(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The items' images stacked: ``pixel_values`` [S, C, H, W], or ``image_features`` [S, N, D] when
    the frozen tower's outputs come from a feature cache."""
    key = "image_features" if "image_features" in items[0] else "pixel_values"
    return {key: torch.stack([item[key] for item in items])}


def collate_packed(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Lays items tagged with ``pack_row`` out as packed rows, right-padded to the longest row.

    Returns the keys of `collate` ([R, T] for R rows; ``pixel_values`` [S, C, H, W] and ``has_image``
    [S] for the S samples, in the order they appear in the rows) plus ``position_ids`` [R, T], which
    restart at 0 at every sample (and on the padding at a row's end).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    num_rows = max(item["pack_row"] for item in batch) + 1
    rows: list[list[dict[str, Any]]] = [[] for _ in range(num_rows)]
    for item in batch:
        rows[item["pack_row"]].append(item)
    lengths = [sum(item["input_ids"].shape[0] for item in row) for row in rows]
    longest = max(lengths)
    input_ids = torch.full((num_rows, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((num_rows, longest), IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros((num_rows, longest), dtype=torch.bool)
    attention_mask = torch.zeros((num_rows, longest), dtype=torch.long)
    position_ids = torch.zeros((num_rows, longest), dtype=torch.long)
    ordered: list[dict[str, Any]] = []
    for r, row in enumerate(rows):
        start = 0
        for item in row:
            end = start + item["input_ids"].shape[0]
            input_ids[r, start:end] = item["input_ids"]
            labels[r, start:end] = item["labels"]
            labels[r, start] = IGNORE_INDEX
            image_mask[r, start:end] = item["image_mask"]
            attention_mask[r, start:end] = 1
            position_ids[r, start:end] = torch.arange(end - start)
            ordered.append(item)
            start = end
        position_ids[r, start:] = torch.arange(longest - start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "image_mask": image_mask,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        **image_inputs(ordered),
        "has_image": torch.tensor([bool(item["has_image"]) for item in ordered], dtype=torch.bool),
    }


class Collator:
    """A picklable ``collate_fn`` for DataLoader workers: pads (or, with ``packing``, packs) batches."""

    def __init__(self, pad_token_id: int, packing: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return collate_packed(batch, self.pad_token_id)
        return collate(batch, self.pad_token_id)
