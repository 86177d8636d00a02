"""Multimodal packing: several samples, visual tokens included, share one row of at most `data.max_length`.

The sampler decides which samples share a row (`pack_rows`, deterministic in the epoch's order);
the dataset view `PackedItems` tags each loaded item with its row; `collate.collate_packed` lays
the rows out. Inside a row every sample restarts its position ids at 0, and its first label is ignored (in a
padded batch nothing predicts a sample's first token either), so the model can keep the samples
apart (a block-diagonal causal mask, or varlen flash attention from the position ids) and the loss
is the padded batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

# Rows kept open for first-fit filling; the oldest is closed when one more is needed. Bounded so a
# row holds samples from one stretch of the shuffled order, not the whole epoch's small ones.
OPEN_ROWS = 32


def pack_rows(order: Sequence[int], lengths: Sequence[int], capacity: int, open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """Samples of `order` packed into rows of at most `capacity` tokens, first fit over `open_rows` open rows.

    A sample longer than `capacity` gets a row of its own (loading it then fails as too long, or is
    skipped, by the data.bad_samples policy). Rows come out in the order they are closed.
    """
    closed: list[list[int]] = []
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        length = lengths[index]
        slot = next((r for r, room in enumerate(free) if room >= length), None)
        if slot is None:
            if len(rows) == open_rows:
                closed.append(rows.pop(0))
                free.pop(0)
            rows.append([])
            free.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(index)
        free[slot] -= length
    return closed + rows


class PackedItems(Dataset[dict[str, Any]]):
    """A dataset seen through a packing sampler: item ``(index, row)`` is ``dataset[index]`` tagged with its row."""

    def __init__(self, dataset: Dataset[dict[str, Any]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, row = key
        return {**self.dataset[index], "pack_row": row}
