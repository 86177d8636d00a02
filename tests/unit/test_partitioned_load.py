"""ZeRO-3 partition ranges and reading only the rows that cover one (mmtrain.models.partitioned_load).

The end-to-end check (2 ranks under ZeRO-3: the weights equal the ones on disk, each rank read half)
is in tests/integration/test_engine_multiprocess.py."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmtrain.models.partitioned_load import checkpoint_files, partition_range, read_flat_range


@pytest.mark.parametrize("numel,world", [(35, 3), (36, 4), (5, 8), (1, 2)])
def test_partition_ranges_tile_the_tensor_like_deepspeed(numel, world):
    ranges = [partition_range(numel, world, rank) for rank in range(world)]
    size = math.ceil(numel / world)  # DeepSpeed pads to a multiple of the world size, then cuts equal parts
    assert [start for start, _ in ranges] == [min(size * r, numel) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_each_rank_reads_exactly_its_slice_of_every_tensor(tmp_path):
    tensors = {"matrix": torch.arange(35.0).reshape(7, 5), "cube": torch.arange(60.0).reshape(3, 4, 5),
               "vector": torch.arange(9.0), "scalar": torch.tensor(3.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert set(checkpoint_files(tmp_path)) == set(tensors)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as shard:
        for name, tensor in tensors.items():
            for world in (1, 2, 3, 4):
                parts = [read_flat_range(shard, name, *partition_range(tensor.numel(), world, r)) for r in range(world)]
                assert torch.equal(torch.cat(parts), tensor.reshape(-1)), (name, world)
    assert checkpoint_files(tmp_path / "nothing") is None
