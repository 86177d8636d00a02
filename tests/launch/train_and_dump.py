"""Test harness: run a real mmtrain training under the launcher and dump what tests inspect.

Writes into OUTPUT_DIR/dump/: every parameter gathered in full before and after training
(`initial.safetensors`, `final.safetensors`), every buffer after training (`buffers.safetensors`) and
the logits of the first 4 training samples (`logits.safetensors`), all from rank 0.
Usage (under `deepspeed` or `torchrun`):
    train_and_dump.py CONFIG.yaml [--set key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mmtrain.engine  # noqa: F401
import torch
from safetensors.torch import save_file

from mmtrain.config import load_config
from mmtrain.engine.distributed import leave_distributed
from mmtrain.engine.trainer import Trainer


def gather_all(model, rank: int) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else torch.no_grad()
        with ctx:
            if rank == 0:
                out[name] = p.detach().cpu().clone().contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    trainer = Trainer(load_config(args.config, args.overrides))
    rank = trainer.rank
    initial = gather_all(trainer.model, rank)
    trainer.fit()
    final = gather_all(trainer.model, rank)
    batch = trainer.collator([trainer.dataset[i] for i in range(4)])
    batch.pop("labels")  # full logits
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(**batch).logits.float().contiguous()
    if rank == 0:
        dump = Path(trainer.cfg.output_dir) / "dump"
        dump.mkdir(exist_ok=True)
        save_file(initial, str(dump / "initial.safetensors"))
        save_file(final, str(dump / "final.safetensors"))
        buffers = {name: b.detach().cpu().clone().contiguous() for name, b in trainer.model.named_buffers()}
        save_file(buffers, str(dump / "buffers.safetensors"))
        save_file({"logits": logits}, str(dump / "logits.safetensors"))


if __name__ == "__main__":
    main()
    leave_distributed(0)
