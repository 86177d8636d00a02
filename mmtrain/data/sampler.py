"""An infinite, resumable batch sampler for data-parallel training, with length/modality grouping and packing.

Training is measured in batches rather than epochs: the sampler yields batches
forever, and a run resumed at global batch ``k`` sees exactly the batches an
uninterrupted run would have seen from its ``k``-th on. Every batch is a
function of (seed, epoch, world size, rank) alone, whatever the grouping.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

import torch

from mmtrain.data.packing import pack_rows

GROUP_BY = ("none", "length", "modality")
# Global batches per length-sorted chunk (Hugging Face's LengthGroupedSampler uses 50): long enough
# for similar lengths to meet, short enough that an epoch still mixes long and short batches.
_MEGABATCH = 50

# A batch: sample indices, or, when packing, (sample index, row within the micro-batch) pairs.
Batch = list[Union[int, tuple[int, int]]]


class StepSampler:
    """Yields lists of sample indices for ``DataLoader(batch_sampler=...)``, forever.

    Epoch ``e`` shuffles ``range(num_samples)`` with a generator seeded
    ``seed + e`` (identity order when ``shuffle`` is False). Then:

    - ``group_by="none"``: the order is padded by wrapping around to a multiple
      of ``world_size``, rank ``r`` gets positions ``r, r + world_size, ...``, cut
      into full batches.
    - ``group_by="length"``: the padded order is cut into chunks of 50 global
      batches, each sorted by length (longest first) and cut into global
      batches of ``batch_size x world_size`` samples; rank ``r`` takes the
      ``r``-th slice of each, and the global batches are shuffled.
    - ``group_by="modality"``: the same within image samples and within
      text-only samples, so a batch holds one modality (LLaVA's
      ``group_by_modality_length``); the leftovers of both share one batch.
    - ``pack_to=L`` (packing): samples are packed in shuffled order into rows
      of at most ``L`` tokens (first fit over a bounded set of open rows); a
      batch is ``batch_size`` rows, given as ``(index, row)`` pairs, and every
      rank gets the same number of batches (the incomplete last global batch
      is dropped).

    Every rank gets the same number of equally sized batches per epoch.
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
        lengths: Sequence[int] | None = None,
        has_image: Sequence[bool] | None = None,
        group_by: str = "none",
        pack_to: int | None = None,
    ) -> None:
        """Creates the sampler.

        Args:
            num_samples: Size of the dataset.
            batch_size: Samples (rows, when packing) per batch on this rank.
            rank: This process's data-parallel rank.
            world_size: Number of data-parallel ranks.
            seed: Base seed of the per-epoch shuffles.
            shuffle: Whether to shuffle each epoch.
            start_batch: Global batch number to start from (for resuming).
            lengths: Each sample's length in tokens (needed to group by length and to pack).
            has_image: Whether each sample has an image (needed to group by modality).
            group_by: ``"none"``, ``"length"`` or ``"modality"``.
            pack_to: Pack samples into rows of this many tokens (None: no packing).

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
        if group_by not in GROUP_BY:
            raise ValueError(f"data.group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
        if pack_to is not None and group_by != "none":
            raise ValueError(f"data.packing fills rows in shuffled order; data.group_by={group_by!r} cannot apply "
                             "to it: set data.group_by: none, or data.packing: false")
        if (group_by != "none" or pack_to is not None) and (lengths is None or len(lengths) != num_samples):
            raise ValueError("grouping by length or modality, and packing, need every sample's length")
        if group_by == "modality" and (has_image is None or len(has_image) != num_samples):
            raise ValueError("grouping by modality needs every sample's has_image")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start_batch = start_batch
        self.lengths = list(lengths) if lengths is not None else None
        self.has_image = list(has_image) if has_image is not None else None
        self.group_by = group_by
        self.pack_to = pack_to
        self._per_rank = -(-num_samples // world_size)
        self._cached: tuple[int, list[Batch]] | None = None
        self._counts: dict[int, int] = {}  # packed epochs' batch counts: epoch_of runs at every logged step
        if self.batches_in_epoch(0) == 0:
            unit = "rows" if pack_to else "samples"
            raise ValueError(
                f"the dataset is too small: {num_samples} samples cannot fill one batch of "
                f"batch_size x world_size = {batch_size} x {world_size} = {batch_size * world_size} {unit}"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (the incomplete last batch is dropped); when packing, epoch 0's."""
        if self.pack_to is None:
            return self._per_rank // self.batch_size
        return self.batches_in_epoch(0)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches each rank gets in `epoch` (the same in every epoch unless packing)."""
        if self.pack_to is None:
            return self._per_rank // self.batch_size
        if epoch not in self._counts:
            self._counts[epoch] = len(self._epoch_batches(epoch))
        return self._counts[epoch]

    def epoch_of(self, batch_number: int) -> int:
        """The epoch that global batch ``batch_number`` belongs to."""
        return self._locate(batch_number)[0]

    def _locate(self, batch_number: int) -> tuple[int, int]:
        """(epoch, batch within it) of global batch ``batch_number``."""
        if self.pack_to is None:
            return divmod(batch_number, self.batches_per_epoch)
        epoch = 0
        while batch_number >= (count := self.batches_in_epoch(epoch)):
            batch_number -= count
            epoch += 1
        return epoch, batch_number

    def _order(self, generator: torch.Generator) -> list[int]:
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return list(range(self.num_samples))

    def _padded_order(self, generator: torch.Generator) -> list[int]:
        """The epoch's order wrapped around to a multiple of world_size (modulo covers world_size > num_samples)."""
        order = self._order(generator)
        return [order[position % self.num_samples] for position in range(self._per_rank * self.world_size)]

    def _rank_indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for one epoch, in order (no grouping, no packing)."""
        padded = self._padded_order(torch.Generator().manual_seed(self.seed + epoch))
        return padded[self.rank::self.world_size]

    def _epoch_batches(self, epoch: int) -> list[Batch]:
        """This rank's batches of one epoch (the last epoch's are kept: resuming asks for them twice)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.group_by == "none" and self.pack_to is None:
            indices = self._rank_indices(epoch)
            batches: list[Batch] = [indices[b * self.batch_size:(b + 1) * self.batch_size]
                                    for b in range(self.batches_in_epoch(epoch))]
        else:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            if self.pack_to is None:
                batches = [g[mine] for g in self._grouped(epoch, generator)]
            else:
                batches = [[(index, slot) for slot, row in enumerate(g[mine]) for index in row]
                           for g in self._packed(epoch, generator)]
        self._cached = (epoch, batches)
        return batches

    def _grouped(self, epoch: int, generator: torch.Generator) -> list[list[int]]:
        """Global batches of batch_size x world_size samples, each of similar lengths (and one modality)."""
        global_size = self.batch_size * self.world_size
        count = (self._per_rank // self.batch_size) * global_size
        order = self._padded_order(generator)[:count]
        if self.group_by == "length":
            pools = [order]
        else:
            pools = [[i for i in order if self.has_image[i]], [i for i in order if not self.has_image[i]]]
        batches: list[list[int]] = []
        leftovers: list[int] = []
        chunk = _MEGABATCH * global_size
        for pool in pools:
            for start in range(0, len(pool), chunk):
                by_length = sorted(pool[start:start + chunk], key=lambda i: -self.lengths[i])
                full = len(by_length) - len(by_length) % global_size
                batches += [by_length[b:b + global_size] for b in range(0, full, global_size)]
                leftovers += by_length[full:]
        leftovers.sort(key=lambda i: -self.lengths[i])
        batches += [leftovers[b:b + global_size] for b in range(0, len(leftovers) - global_size + 1, global_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist() if self.shuffle else range(len(batches))
        return [batches[b] for b in shuffled]

    def _packed(self, epoch: int, generator: torch.Generator) -> list[list[list[int]]]:
        """Global batches of batch_size x world_size packed rows (lists of sample indices)."""
        rows = pack_rows(self._order(generator), self.lengths, self.pack_to)
        global_size = self.batch_size * self.world_size
        return [rows[start:start + global_size] for start in range(0, len(rows) - global_size + 1, global_size)]

    def __iter__(self) -> Iterator[Batch]:
        epoch, offset = self._locate(self.start_batch)
        while True:
            batches = self._epoch_batches(epoch)
            yield from batches[offset:]
            epoch, offset = epoch + 1, 0
