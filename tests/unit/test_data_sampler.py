"""Tests for mmtrain.data.sampler.StepSampler."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from mmtrain.data.sampler import StepSampler


def take(sampler: StepSampler, count: int) -> list[list[int]]:
    return list(islice(iter(sampler), count))


def test_same_seed_same_order_other_seed_differs() -> None:
    first = take(StepSampler(50, 4, 0, 2, seed=3), 20)
    assert first == take(StepSampler(50, 4, 0, 2, seed=3), 20)
    assert first != take(StepSampler(50, 4, 0, 2, seed=4), 20)


def test_epoch_uses_seeded_permutation() -> None:
    sampler = StepSampler(12, 3, 0, 1, seed=5)
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(5)).tolist()
    assert sum(take(sampler, 4), []) == expected
    next_epoch = torch.randperm(12, generator=torch.Generator().manual_seed(6)).tolist()
    assert sum(take(sampler, 8)[4:], []) == next_epoch


@pytest.mark.parametrize(("num_samples", "world_size", "batch_size"), [(40, 4, 5), (37, 4, 3), (10, 3, 2), (5, 8, 1)])
def test_ranks_split_an_epoch(num_samples: int, world_size: int, batch_size: int) -> None:
    samplers = [StepSampler(num_samples, batch_size, rank, world_size, seed=0) for rank in range(world_size)]
    per_epoch = samplers[0].batches_per_epoch
    assert per_epoch == -(-num_samples // world_size) // batch_size
    assert all(sampler.batches_per_epoch == per_epoch for sampler in samplers)
    epochs = [take(sampler, per_epoch) for sampler in samplers]
    assert all(len(batch) == batch_size for batches in epochs for batch in batches)
    seen = [index for batches in epochs for batch in batches for index in batch]
    assert all(0 <= index < num_samples for index in seen)
    if world_size * per_epoch * batch_size <= num_samples:
        # Without wrap-around padding no sample is given to two ranks in one epoch.
        assert len(seen) == len(set(seen))


def test_disjoint_ranks_cover_the_dataset_when_it_divides() -> None:
    samplers = [StepSampler(24, 3, rank, 4, seed=1) for rank in range(4)]
    seen = [index for sampler in samplers for batch in take(sampler, 2) for index in batch]
    assert sorted(seen) == list(range(24))


def test_padding_wraps_to_the_start_of_the_permutation() -> None:
    # 10 samples on 4 ranks: 12 positions, the last two repeat the first two of the order.
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    padded = order + order[:2]
    for rank in range(4):
        assert take(StepSampler(10, 3, rank, 4, seed=0), 1) == [padded[rank::4]]


@pytest.mark.parametrize("start", [0, 1, 4, 5, 6, 9, 10, 17, 23])
def test_resume_equals_uninterrupted(start: int) -> None:
    full = take(StepSampler(23, 4, 1, 2, seed=11), 30)  # 5 batches per epoch
    resumed = StepSampler(23, 4, 1, 2, seed=11, start_batch=start)
    assert take(resumed, 30 - start) == full[start:]


def test_epoch_of_and_resume_skips_without_computing_earlier_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = StepSampler(20, 5, 0, 1, seed=0, start_batch=4 * 1000 + 2)
    assert sampler.batches_per_epoch == 4
    assert sampler.epoch_of(0) == 0 and sampler.epoch_of(3) == 0 and sampler.epoch_of(4) == 1
    assert sampler.epoch_of(4002) == 1000
    epochs: list[int] = []
    original = StepSampler._rank_indices

    def spy(self: StepSampler, epoch: int) -> list[int]:
        epochs.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(StepSampler, "_rank_indices", spy)
    assert len(take(sampler, 3)) == 3
    assert epochs == [1000, 1001]


def test_no_shuffle_is_in_order() -> None:
    assert take(StepSampler(10, 2, 0, 1, seed=9, shuffle=False), 6) == [
        [0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [0, 1]]
    assert take(StepSampler(10, 2, 1, 2, seed=9, shuffle=False), 3) == [[1, 3], [5, 7], [1, 3]]


def test_drops_incomplete_last_batch() -> None:
    sampler = StepSampler(11, 3, 0, 1, seed=0, shuffle=False)
    assert sampler.batches_per_epoch == 3
    assert take(sampler, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_too_small_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="too small.*4 x 2 = 8"):
        StepSampler(6, 4, 0, 2, seed=0)
    for kwargs in ({"num_samples": 0}, {"batch_size": 0}, {"rank": 2}, {"world_size": 0}, {"start_batch": -1}):
        arguments = {"num_samples": 8, "batch_size": 2, "rank": 0, "world_size": 2, "seed": 0} | kwargs
        with pytest.raises(ValueError):
            StepSampler(**arguments)
