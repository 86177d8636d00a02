"""Length/modality grouping and multimodal packing: the sampler's plans, the packed collation, the mask."""

from __future__ import annotations

import random
from itertools import islice

import pytest
import torch

from mmtrain.data.collate import collate, collate_packed
from mmtrain.data.packing import OPEN_ROWS, pack_rows
from mmtrain.data.sampler import StepSampler
from mmtrain.data.templates import IGNORE_INDEX
from mmtrain.engine.loader import resolve_num_workers
from mmtrain.models.attention import packed_attention_inputs

LENGTHS = [random.Random(i).randint(4, 60) for i in range(200)]
HAS_IMAGE = [i % 3 != 0 for i in range(200)]


def take(sampler: StepSampler, count: int) -> list:
    return list(islice(iter(sampler), count))


def test_pack_rows_first_fit_within_capacity_keeps_every_sample_once() -> None:
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()
    rows = pack_rows(order, LENGTHS, 64)
    assert sorted(i for row in rows for i in row) == sorted(order)
    assert all(sum(LENGTHS[i] for i in row) <= 64 for row in rows)
    assert 1 - sum(LENGTHS) / (64 * len(rows)) < 0.10  # first fit leaves little room unused
    assert pack_rows([0, 1, 2], [70, 10, 10], 64) == [[0], [1, 2]]  # too long: a row of its own


def test_pack_rows_keeps_a_bounded_window_of_open_rows() -> None:
    # Each sample fills 60% of a row: none ever shares, rows close oldest first, in order.
    rows = pack_rows(range(3 * OPEN_ROWS), [6] * (3 * OPEN_ROWS), 10)
    assert rows == [[i] for i in range(3 * OPEN_ROWS)]


@pytest.mark.parametrize("kwargs", [{"group_by": "length"}, {"group_by": "modality"}, {"pack_to": 64}],
                         ids=["length", "modality", "packing"])
def test_grouped_and_packed_batches_resume_exactly_and_equal_across_ranks(kwargs) -> None:
    def sampler(rank: int, world: int = 2, start: int = 0, seed: int = 3) -> StepSampler:
        return StepSampler(200, 3, rank, world, seed, start_batch=start, lengths=LENGTHS, has_image=HAS_IMAGE,
                           **kwargs)

    full = take(sampler(1), 90)  # over several epochs
    for start in (0, 1, 16, 33, 34, 61):
        assert take(sampler(1, start=start), 90 - start) == full[start:]
    assert take(sampler(1), 90) == full and take(sampler(1, seed=4), 90) != full
    assert take(sampler(1, world=4), 20) != full[:20]
    for epoch in range(4):  # every rank runs the same number of forwards, of equal batch size
        counts = {sampler(rank).batches_in_epoch(epoch) for rank in range(2)}
        assert len(counts) == 1
    for batch in full:
        if "pack_to" in kwargs:
            assert {row for _, row in batch} == {0, 1, 2}
            for row in range(3):
                assert sum(LENGTHS[i] for i, r in batch if r == row) <= 64
        else:
            assert len(batch) == 3


def test_length_grouping_gathers_similar_lengths() -> None:
    def spread(batches) -> float:
        return sum(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in batches) / len(batches)

    plain = take(StepSampler(200, 4, 0, 2, 0, lengths=LENGTHS), 25)
    grouped = take(StepSampler(200, 4, 0, 2, 0, lengths=LENGTHS, group_by="length"), 25)
    assert spread(grouped) < spread(plain) / 4
    # Global batches: both ranks' slices of one step come from one length-sorted run.
    other = take(StepSampler(200, 4, 1, 2, 0, lengths=LENGTHS, group_by="length"), 25)
    assert all(min(LENGTHS[i] for i in a) >= max(LENGTHS[i] for i in b) for a, b in zip(grouped, other))


def test_modality_grouping_gives_single_modality_batches() -> None:
    sampler = StepSampler(200, 4, 0, 2, 0, lengths=LENGTHS, has_image=HAS_IMAGE, group_by="modality")
    batches = take(sampler, sampler.batches_per_epoch)
    mixed = [b for b in batches if len({HAS_IMAGE[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the leftovers of both modalities share a batch


def test_bad_grouping_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="data.group_by must be one of"):
        StepSampler(20, 2, 0, 1, 0, lengths=LENGTHS[:20], group_by="size")
    with pytest.raises(ValueError, match="data.packing"):
        StepSampler(20, 2, 0, 1, 0, lengths=LENGTHS[:20], group_by="length", pack_to=64)
    with pytest.raises(ValueError, match="length"):
        StepSampler(20, 2, 0, 1, 0, pack_to=64)
    with pytest.raises(ValueError, match="too small.*rows"):
        StepSampler(4, 2, 0, 2, 0, lengths=[4] * 4, pack_to=64)


def _item(length: int, image_tokens: int, has_image: bool, first_id: int) -> dict:
    ids = torch.arange(first_id, first_id + length)
    labels = ids.clone()
    labels[: image_tokens + 1] = IGNORE_INDEX
    mask = torch.zeros(length, dtype=torch.bool)
    mask[1:1 + image_tokens] = has_image
    return {"input_ids": ids, "labels": labels, "image_mask": mask, "pixel_values": torch.full((3, 2, 2), float(first_id)),
            "has_image": has_image}


def test_collate_packed_restarts_positions_and_ignores_each_first_label() -> None:
    items = [_item(5, 2, True, 100), _item(3, 0, False, 200), _item(4, 2, True, 300)]
    labels_first = items[1]["labels"].clone()
    labels_first[0] = 7  # a first-position target: in a padded batch nothing predicts it
    items[1]["labels"] = labels_first
    batch = collate_packed([{**items[0], "pack_row": 0}, {**items[2], "pack_row": 1}, {**items[1], "pack_row": 0}], 0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["labels"][0, 5].item() == IGNORE_INDEX and batch["labels"][0, 6].item() == 201
    # Images in the order their samples appear in the rows, row by row.
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [100.0, 200.0, 300.0]
    assert batch["has_image"].tolist() == [True, False, True]
    assert int(batch["image_mask"].sum()) == 4
    padded = collate(items, 0)
    assert padded["attention_mask"].sum() == batch["attention_mask"].sum()


def test_block_diagonal_mask_keeps_samples_apart() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0]])
    mask = packed_attention_inputs(positions, valid, "sdpa", torch.float32)["attention_mask"][0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    flash = packed_attention_inputs(positions, valid, "flash_attention_2", torch.bfloat16)
    assert flash["attention_mask"] is None and flash["position_ids"] is positions


def test_auto_workers_fit_the_machine() -> None:
    assert resolve_num_workers(3, on_gpu=False, local_ranks=2) == 3
    assert resolve_num_workers("auto", on_gpu=False, local_ranks=1, cpus=64) == 0
    assert resolve_num_workers("auto", on_gpu=True, local_ranks=8, cpus=16) == 1
    assert resolve_num_workers("auto", on_gpu=True, local_ranks=1, cpus=16) == 4
    assert resolve_num_workers("auto", on_gpu=True, local_ranks=2, cpus=2) == 0


def test_packed_epoch_lengths_are_planned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = StepSampler(200, 3, 0, 2, 0, lengths=LENGTHS, pack_to=64)
    planned: list[int] = []
    original = StepSampler._packed

    def spy(self, epoch, generator):
        planned.append(epoch)
        return original(self, epoch, generator)

    monkeypatch.setattr(StepSampler, "_packed", spy)
    last = sum(sampler.batches_in_epoch(e) for e in range(5)) - 1
    for _ in range(3):  # the training loop asks at every logged step
        assert sampler.epoch_of(last) == 4
    assert sorted(planned) == [1, 2, 3, 4]  # epoch 0 was planned when the sampler was made
