"""An infinite, resumable batch sampler for data-parallel training.

Training is measured in batches rather than epochs: the sampler yields batches
forever, and a run resumed at global batch ``k`` sees exactly the batches an
uninterrupted run would have seen from its ``k``-th on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StepSampler:
    """Yields lists of sample indices for ``DataLoader(batch_sampler=...)``, forever.

    Epoch ``e`` shuffles ``range(num_samples)`` with a generator seeded
    ``seed + e`` (identity order when ``shuffle`` is False), pads it by
    wrapping around to a multiple of ``world_size``, gives rank ``r`` the
    positions ``r, r + world_size, ...``, and cuts those into full batches.
    Every rank thus gets the same number of equally sized batches per epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        start_batch: int = 0,
    ) -> None:
        """Creates the sampler.

        Args:
            num_samples: Size of the dataset.
            batch_size: Samples per batch on this rank.
            rank: This process's data-parallel rank.
            world_size: Number of data-parallel ranks.
            seed: Base seed of the per-epoch shuffles.
            shuffle: Whether to shuffle each epoch.
            start_batch: Global batch number to start from (for resuming).

        Raises:
            ValueError: An argument is out of range, or the dataset is too
                small to give every rank one full batch per epoch.
        """
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0:
            raise ValueError(f"world_size must be positive, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_batch < 0:
            raise ValueError(f"start_batch must not be negative, got {start_batch}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start_batch = start_batch
        self._per_rank = -(-num_samples // world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset is too small: {num_samples} samples cannot fill one batch of "
                f"batch_size x world_size = {batch_size} x {world_size} = {batch_size * world_size}"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (the incomplete last batch is dropped)."""
        return self._per_rank // self.batch_size

    def epoch_of(self, batch_number: int) -> int:
        """The epoch that global batch ``batch_number`` belongs to."""
        return batch_number // self.batches_per_epoch

    def _rank_indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for one epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        padded_length = self._per_rank * self.world_size
        # Wrapping around pads the order; modulo also covers world_size > num_samples.
        return [order[position % self.num_samples] for position in range(self.rank, padded_length, self.world_size)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            indices = self._rank_indices(epoch)
            for batch in range(offset, self.batches_per_epoch):
                yield indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0
