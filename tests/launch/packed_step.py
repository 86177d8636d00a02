"""Test harness: one forward/backward of the same samples, padded or packed, under the launcher.

Each rank takes its own 6 samples (image-text and text-only), runs them as one padded batch or as
packed rows, and backpropagates once; the loss of every rank and the full gradient of every
trainable parameter go to OUT (safetensors, rank 0). Usage (under `deepspeed` or `torchrun`):
    packed_step.py CONFIG.yaml {padded|packed} OUT
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

import mmtrain.engine  # noqa: F401
from mmtrain.config import load_config
from mmtrain.data.collate import collate, collate_packed
from mmtrain.data.packing import pack_rows
from mmtrain.engine.distributed import leave_distributed
from mmtrain.engine.trainer import Trainer

SAMPLES_PER_RANK = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("mode", choices=["padded", "packed"])
    parser.add_argument("out")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    import deepspeed
    import deepspeed.comm as dist

    trainer = Trainer(load_config(args.config))
    dataset, rank = trainer.dataset, trainer.rank
    # Every rank mixes text-only samples (the end of the dataset) with image-text ones.
    indices = [rank * 4 + i for i in range(4)] + [len(dataset) - 1 - rank * 2 - i for i in range(2)]
    items = [dataset[i] for i in indices]
    if args.mode == "padded":
        batch = collate(items, trainer.tokenizer.pad_token_id)
    else:
        lengths = [item["input_ids"].shape[0] for item in items]
        rows = pack_rows(range(len(items)), lengths, trainer.cfg.data.max_length)
        assert len(rows) < len(items), "nothing was packed: the test would not test packing"
        batch = collate_packed([{**items[i], "pack_row": r} for r, row in enumerate(rows) for i in row],
                               trainer.tokenizer.pad_token_id)
    engine = trainer.engine
    engine.train()
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    loss = engine(**batch).loss
    engine.backward(loss)
    losses = torch.zeros(trainer.world_size, dtype=torch.float64)
    losses[rank] = loss.detach().double()
    dist.all_reduce(losses)
    dump = {"losses": losses}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            grad = deepspeed.utils.safe_get_full_grad(param)
            if rank == 0:
                dump[f"grad.{name}"] = grad.detach().float().cpu().contiguous()
    if rank == 0:
        dump["rows"] = torch.tensor(batch["input_ids"].shape)
        save_file(dump, args.out)


if __name__ == "__main__":
    main()
    leave_distributed(0)
