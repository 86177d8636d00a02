"""Load a safetensors checkpoint straight into ZeRO-3 partitions: each rank reads only its own slice.

Under ZeRO-3, Hugging Face's `from_pretrained` reads every shard of the checkpoint on rank 0 into one
state dict and hands the values over module by module, so rank 0's memory grows with the whole model
(a 70B target is 140 GB in bf16). Here the model is first built empty-but-partitioned (`from_config`
inside `deepspeed.zero.Init`); then, for each parameter, each rank computes the flat range its
partition holds (DeepSpeed's layout: the flattened tensor, padded to a multiple of the world size, cut
into equal parts in rank order), reads from the shard only the rows that cover that range, and copies
it into its partition. No rank ever holds more than its partition plus the rows of one tensor it
reads; nothing is gathered, no rank waits for another.

Building the empty model must not cost what loading it saves: Hugging Face's ZeRO-3 construction draws
random values for every parameter, gathering each module whole onto rank 0 to do so, only for the
checkpoint to overwrite them. `buffers_only_init` skips that and initialises what the checkpoint does
not hold: the buffers (RoPE's `inv_freq`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(folder: str | Path) -> dict[str, Path] | None:
    """Tensor name -> shard file of a local safetensors checkpoint folder; None when it is not one."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            return {name: folder / SINGLE_FILE for name in f.keys()}
    return None


def is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_numel")


def fits(model: nn.Module, files: dict[str, Path]) -> list[str]:
    """The model's parameters the checkpoint lacks (tied parameters appear once, under their first name)."""
    return [name for name, _ in model.named_parameters() if name not in files]


@contextmanager
def buffers_only_init() -> Iterator[None]:
    """While a model is built under ZeRO-3 to be loaded with `load_into_partitions`: every parameter is
    marked initialised (as `from_pretrained` marks the ones it loads), so that Hugging Face's weight
    initialisation, run on each rank without gathering, sets only the buffers."""
    # heavy (seconds to import): only where a model is built
    from transformers.integrations import deepspeed as hf_deepspeed

    gathering_init = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if gathering_init is None:  # a transformers that builds ZeRO-3 models another way: keep its init
        yield
        return

    def init_buffers_only(model: nn.Module) -> None:
        for param in model.parameters():
            param._is_hf_initialized = True
        model.initialize_weights()

    hf_deepspeed.initialize_weights_zero3 = init_buffers_only
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = gathering_init


def partition_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the flattened parameter that `rank`'s ZeRO-3 partition holds (end may equal start
    for a rank whose partition is all padding)."""
    size = math.ceil(numel / world_size)
    start = min(size * rank, numel)
    return start, min(start + size, numel)


def read_flat_range(shard, name: str, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of the flattened tensor `name`, reading only the rows that cover them."""
    view = shard.get_slice(name)
    shape = view.get_shape()
    if len(shape) == 0:
        return shard.get_tensor(name).reshape(-1)[start:end]
    row = math.prod(shape[1:])
    first, last = start // row, math.ceil(end / row)
    rows = view[first:last].reshape(-1)
    return rows[start - first * row:end - first * row]


@torch.no_grad()
def load_into_partitions(model: nn.Module, folder: str | Path, rank: int, world_size: int) -> int:
    """Copy the checkpoint in `folder` into `model`'s ZeRO-3 partitions (this rank's part only).

    Parameters DeepSpeed keeps whole on every rank (persistent small ones) get the full tensor as well.

    Returns:
        The number of checkpoint elements this rank read.

    Raises:
        KeyError: the checkpoint lacks one of the model's parameters (the caller falls back to
            `from_pretrained`, which knows the architecture's renamings).
    """
    files = checkpoint_files(folder)
    if files is None:
        raise KeyError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    missing = fits(model, files)
    if missing:
        raise KeyError(f"{folder} lacks {len(missing)} of the model's parameters, e.g. {missing[:3]}")
    by_file: dict[Path, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        by_file.setdefault(files[name], []).append((name, param))
    read = 0
    for path, params in sorted(by_file.items()):
        with safe_open(str(path), framework="pt") as shard:
            for name, param in params:
                read += _load_one(shard, name, param, rank, world_size)
    return read


def _load_one(shard, name: str, param: nn.Parameter, rank: int, world_size: int) -> int:
    shape = tuple(shard.get_slice(name).get_shape())
    expected = tuple(getattr(param, "ds_shape", param.shape))
    if shape != expected:
        raise ValueError(f"{name}: checkpoint shape {shape}, model {expected}")
    if not is_partitioned(param):
        param.copy_(shard.get_tensor(name).to(param.dtype))
        return param.numel()
    numel = int(param.ds_numel)
    if param.data.numel() == numel:  # kept whole on every rank (persistent): the full tensor, and its partition
        full = shard.get_tensor(name).to(param.dtype)
        param.data.copy_(full.reshape(param.data.shape))
        start, end = partition_range(numel, world_size, rank)
        param.ds_tensor[:end - start].copy_(full.reshape(-1)[start:end])
        return numel
    start, end = partition_range(numel, world_size, rank)
    if end > start:
        param.ds_tensor[:end - start].copy_(read_flat_range(shard, name, start, end).to(param.ds_tensor.dtype))
    return end - start
