"""Validation loss during training: token-weighted mean loss and perplexity over a manifest.

Every rank evaluates its share of the samples (rank r takes r, r + world, ...); the shares are
padded by wrapping so that all ranks run the same number of forwards (ZeRO-3 gathers parameters
collectively), and the padding samples' labels are masked out so nothing is counted twice.
"""

from __future__ import annotations

import math

import torch

from mmtrain.data import IGNORE_INDEX


def rank_share(num_samples: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """(sample index, counts) pairs for one rank; padding entries have counts=False."""
    per_rank = math.ceil(num_samples / world_size)
    share = []
    for k in range(per_rank):
        position = rank + k * world_size
        share.append((position % num_samples, position < num_samples))
    return share


@torch.no_grad()
def validation_loss(engine, dataset, collator, micro_batch_size: int, rank: int, world_size: int) -> dict[str, float]:
    """Mean next-token loss over every target token of `dataset`, and its perplexity."""
    # heavy; imported where used, once the accelerator is chosen
    import deepspeed.comm as dist

    share = rank_share(len(dataset), rank, world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    was_training = engine.module.training
    engine.eval()
    for start in range(0, len(share), micro_batch_size):
        chunk = share[start:start + micro_batch_size]
        items = []
        for index, counts in chunk:
            item = dataset[index]
            if not counts:
                item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
            items.append(item)
        batch = {k: v.to(engine.device) for k, v in collator(items).items()}
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = engine(**batch).loss
        if targets:
            totals[0] += loss.double() * targets
            totals[1] += targets
    dist.all_reduce(totals)
    totals = totals.cpu()
    if was_training:
        engine.train()
    mean = float(totals[0] / totals[1]) if totals[1] else float("nan")
    return {"val_loss": mean, "val_ppl": math.exp(mean) if mean == mean else float("nan"),
            "val_tokens": int(totals[1])}
