"""The training DataLoader: the sampler for `data.group_by` / `data.packing`, and workers that fit the machine."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader

from mmtrain.config.errors import ConfigError
from mmtrain.config.schema import DataConfig
from mmtrain.data import Collator, StepSampler, VLMDataset
from mmtrain.data.packing import PackedItems

# Workers per rank that `auto` allows on GPU machines: beyond this, decoding outpaces any step here.
MAX_AUTO_WORKERS = 4


def resolve_num_workers(setting: int | str, on_gpu: bool, local_ranks: int, cpus: int | None = None) -> int:
    """`data.num_workers` as a number: `auto` gives each GPU rank up to 4 workers, leaving one core to
    the rank itself; on CPU machines the ranks compute on every core, so loading stays inline."""
    if setting != "auto":
        return int(setting)
    if not on_gpu:
        return 0
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(0, min(MAX_AUTO_WORKERS, cpus // max(1, local_ranks) - 1))


def local_world_size() -> int:
    """Ranks on this machine (the launchers' LOCAL_WORLD_SIZE; SLURM's tasks per node)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit():
            return int(value)
    return 1


def check_packing_support(model) -> None:
    """Packing needs a decoder-only LLM without an MMA modality token (one per row, not per sample)."""
    if getattr(model.llm, "is_encoder_decoder", False):
        raise ConfigError("data.packing: an encoder-decoder LLM (T5/BART) reads one sample per encoder input; "
                          "set data.packing: false")
    if getattr(model.llm, "modality", None) is not None:
        raise ConfigError("data.packing cannot keep packed samples apart around an MMA modality token (one per "
                          "row, not per sample); set data.packing: false, or model.llm.adapter.modality_token: false")


def build_sampler(dataset: VLMDataset, data: DataConfig, micro_batch_size: int, rank: int, world_size: int,
                  seed: int, start_batch: int) -> StepSampler:
    """The step sampler for the data settings (lengths are computed only when grouping or packing)."""
    needs_lengths = data.packing or data.group_by != "none"
    return StepSampler(len(dataset), micro_batch_size, rank, world_size, seed, shuffle=data.shuffle,
                       start_batch=start_batch, lengths=dataset.token_lengths() if needs_lengths else None,
                       has_image=dataset.image_flags() if data.group_by == "modality" else None,
                       group_by=data.group_by, pack_to=data.max_length if data.packing else None)


def build_loader(dataset: VLMDataset, sampler: StepSampler, collator: Collator, data: DataConfig,
                 on_gpu: bool) -> DataLoader:
    """The DataLoader over `sampler`'s batches; workers persist across epochs, memory is pinned on GPUs."""
    workers = resolve_num_workers(data.num_workers, on_gpu, local_world_size())
    return DataLoader(PackedItems(dataset) if data.packing else dataset, batch_sampler=sampler, collate_fn=collator,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=on_gpu and workers > 0)


__all__ = ["build_loader", "build_sampler", "check_packing_support", "resolve_num_workers"]
