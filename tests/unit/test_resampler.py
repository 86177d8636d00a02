"""The MLP resampler's spatial merge (Qwen2-VL's patch merger): which tokens it joins, how many it
gives, and the errors that name the key when the tower's tokens cannot be merged."""

from __future__ import annotations

import pytest
import torch

from mmtrain.config import from_dict
from mmtrain.config.errors import ConfigError
from mmtrain.config.rules import value_problems
from mmtrain.config.schema import ResamplerConfig, RunConfig
from mmtrain.models.resampler import MLPResampler, merge_patches


def test_merge_joins_each_k_by_k_block_of_the_row_major_grid():
    side, dim = 4, 3
    grid = torch.arange(side * side * dim, dtype=torch.float32).view(1, side * side, dim)
    merged = merge_patches(grid, 2)
    assert merged.shape == (1, 4, 12)
    # the top-left output token is patches (0,0), (0,1), (1,0), (1,1) = tokens 0, 1, 4, 5, in that order
    assert torch.equal(merged[0, 0], torch.cat([grid[0, i] for i in (0, 1, 4, 5)]))
    # the bottom-right one is tokens 10, 11, 14, 15
    assert torch.equal(merged[0, 3], torch.cat([grid[0, i] for i in (10, 11, 14, 15)]))


def test_merging_mlp_gives_fewer_tokens_and_keeps_the_batch_apart():
    torch.manual_seed(0)
    resampler = MLPResampler(8, ResamplerConfig(kind="mlp", hidden_size=16, spatial_merge=4))
    assert resampler.num_output_tokens(256) == 16
    feats = torch.randn(2, 256, 8)
    out = resampler(feats)
    assert out.shape == (2, 16, 16)
    assert torch.allclose(resampler(feats[1:]), out[1:], atol=1e-6)  # no mixing across samples
    plain = MLPResampler(8, ResamplerConfig(kind="mlp", hidden_size=16))
    assert plain.num_output_tokens(25) == 25 and plain(torch.randn(1, 25, 8)).shape == (1, 25, 16)


def test_unmergeable_token_counts_name_the_key_and_the_fix():
    resampler = MLPResampler(8, ResamplerConfig(kind="mlp", hidden_size=16, spatial_merge=2))
    with pytest.raises(ConfigError, match=r"spatial_merge=2 .* gives 257 tokens; set model.vision.drop_cls: true"):
        resampler.num_output_tokens(257)
    with pytest.raises(ConfigError, match="gives 25 tokens"):  # 5 x 5: not a multiple of 2
        resampler.num_output_tokens(25)


def test_config_rules_refuse_a_merge_outside_the_mlp_or_below_one():
    cfg = from_dict(RunConfig, {"model": {"resampler": {"kind": "qformer", "spatial_merge": 2}}})
    assert any("applies to `kind: mlp` only" in p for p in value_problems(cfg))
    cfg = from_dict(RunConfig, {"model": {"resampler": {"kind": "mlp", "spatial_merge": 0}}})
    assert any("`model.resampler.spatial_merge` = 0 must be" in p for p in value_problems(cfg))
