"""Tests for mmtrain.data.dataset.VLMDataset: loading, errors and the skip policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmtrain.data.collate import Collator
from mmtrain.data.dataset import VLMDataset
from mmtrain.data.errors import BadSampleError
from mmtrain.data.manifest import read_manifest
from mmtrain.data.synthetic import make_tiny_tokenizer
from mmtrain.data.templates import IGNORE_INDEX, get_template

SHAPE = (3, 8, 8)
N = 4


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.resize(SHAPE[1:]), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    texts = ["a red circle.", "a blue square.", "What is it? It is red."] * 5
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(texts, tmp_path_factory.mktemp("tok"), 320))


def _dataset(tmp_path: Path, records: list[dict[str, Any]], tok: Any, **options: Any) -> VLMDataset:
    Image.new("RGB", (10, 10), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    settings: dict[str, Any] = {"max_length": 64, "template": get_template("plain"), "num_image_tokens": N}
    settings.update(options)
    return VLMDataset(read_manifest(manifest), tok, to_tensor, SHAPE, **settings)


def test_item_tensors(tmp_path: Path, tok: Any) -> None:
    data = _dataset(tmp_path, [
        {"image": "red.png", "text": "a red circle."},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a blue square."}]},
    ], tok)
    item = data[0]
    assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
    assert item["image_mask"].dtype == torch.bool
    assert item["input_ids"].shape == item["labels"].shape == item["image_mask"].shape
    assert int(item["image_mask"].sum()) == N
    assert item["has_image"] is True
    assert item["pixel_values"].dtype == torch.float32 and tuple(item["pixel_values"].shape) == SHAPE
    assert torch.allclose(item["pixel_values"][0], torch.ones(8, 8))
    assert torch.allclose(item["pixel_values"][2], torch.zeros(8, 8))
    text_only = data[1]
    assert text_only["has_image"] is False
    assert not text_only["image_mask"].any()
    assert torch.equal(text_only["pixel_values"], torch.zeros(SHAPE))


BAD = [
    ({"image": "missing.png", "text": "a red circle."}, "image file not found"),
    ({"image": "corrupt.png", "text": "a red circle."}, "not a readable image"),
    ({"image": "red.png", "text": "   "}, "empty text"),
]


@pytest.mark.parametrize(("record", "reason"), BAD)
def test_error_policy_raises_with_location(tmp_path: Path, tok: Any, record: dict[str, Any], reason: str) -> None:
    data = _dataset(tmp_path, [{"image": "red.png", "text": "a red circle."}, record], tok)
    with pytest.raises(BadSampleError) as caught:
        data[1]
    assert (caught.value.manifest, caught.value.line) == (tmp_path / "m.jsonl", 2)
    assert reason in caught.value.reason


def test_too_long_text(tmp_path: Path, tok: Any) -> None:
    record = {"image": "red.png", "text": "a red circle. " * 30}
    data = _dataset(tmp_path, [record], tok, max_length=40)
    length = 1 + N + len(tok.encode(record["text"], add_special_tokens=False)) + 1
    with pytest.raises(BadSampleError) as caught:
        data[0]
    assert caught.value.reason == f"text longer than the context: {length} tokens > data.max_length 40"
    assert len(_dataset(tmp_path, [record], tok, max_length=length)[0]["input_ids"]) == length


def test_skip_policy_logs_counts_and_returns_next_good(tmp_path: Path, tok: Any) -> None:
    log = tmp_path / "logs" / "skipped.jsonl"
    data = _dataset(tmp_path, [
        {"image": "red.png", "text": "a red circle."},
        {"image": "missing.png", "text": "a red circle."},
        {"image": "corrupt.png", "text": "a red circle."},
        {"image": "blue.png", "text": "a blue square."},
    ], tok, bad_samples="skip", skip_log=log)
    item = data[1]
    assert torch.equal(item["input_ids"], data.load(3)["input_ids"])
    assert item["pixel_values"][2, 0, 0] == 1.0  # the blue image
    assert data.skipped == 2
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    manifest = str(tmp_path / "m.jsonl")
    assert [(entry["manifest"], entry["line"]) for entry in lines] == [(manifest, 2), (manifest, 3)]
    assert "image file not found" in lines[0]["reason"] and "not a readable image" in lines[1]["reason"]
    # Known bad samples are skipped again without another log line.
    assert torch.equal(data[2]["input_ids"], item["input_ids"])
    assert data.skipped == 2 and len(log.read_text().splitlines()) == 2
    assert torch.equal(data[0]["input_ids"], data.load(0)["input_ids"])


def test_skip_wraps_around_to_the_start(tmp_path: Path, tok: Any) -> None:
    data = _dataset(tmp_path, [
        {"image": "red.png", "text": "a red circle."},
        {"image": "missing.png", "text": "x"},
    ], tok, bad_samples="skip")
    assert torch.equal(data[1]["input_ids"], data.load(0)["input_ids"])
    assert data.skipped == 1


def test_skip_without_log_still_warns(tmp_path: Path, tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    data = _dataset(tmp_path, [{"image": "missing.png", "text": "x"}, {"image": "red.png", "text": "a"}], tok,
                    bad_samples="skip")
    with caplog.at_level("WARNING"):
        data[0]
    assert "m.jsonl:1: image file not found" in caplog.text


def test_all_bad_raises(tmp_path: Path, tok: Any) -> None:
    log = tmp_path / "skipped.jsonl"
    data = _dataset(tmp_path, [{"image": "missing.png", "text": "x"}, {"image": "red.png", "text": " "}], tok,
                    bad_samples="skip", skip_log=log)
    with pytest.raises(BadSampleError, match="every one of the 2 samples is unusable"):
        data[1]
    assert len(log.read_text().splitlines()) == 2


def test_unknown_policy(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(ValueError, match="data.bad_samples must be one of error, skip, got 'ignore'"):
        _dataset(tmp_path, [{"image": "red.png", "text": "a"}], tok, bad_samples="ignore")


def test_wrong_transform_shape_is_fatal(tmp_path: Path, tok: Any) -> None:
    data = _dataset(tmp_path, [{"image": "red.png", "text": "a"}], tok, bad_samples="skip")
    data.image_transform = lambda image: torch.zeros(3, 4, 4)
    with pytest.raises(RuntimeError, match="expected"):
        data[0]


def test_skip_log_from_worker_processes(tmp_path: Path, tok: Any) -> None:
    good = {"image": "red.png", "text": "a red circle."}
    bad = {"image": "missing.png", "text": "a red circle."}
    records = [good if i % 3 == 0 else bad for i in range(24)]
    log = tmp_path / "skipped.jsonl"
    data = _dataset(tmp_path, records, tok, bad_samples="skip", skip_log=log)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=Collator(tok.pad_token_id))
    batches = list(loader)
    assert sum(batch["input_ids"].shape[0] for batch in batches) == 24
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert {entry["line"] for entry in entries} == {i + 1 for i in range(24) if i % 3}
    assert all(set(entry) == {"manifest", "line", "reason"} for entry in entries)
    assert all((batch["labels"] != IGNORE_INDEX).any() for batch in batches)


def test_error_keeps_its_type_across_worker_processes(tmp_path: Path, tok: Any) -> None:
    data = _dataset(tmp_path, [{"image": "red.png", "text": "a"}, {"image": "missing.png", "text": "a"}], tok)
    loader = DataLoader(data, batch_size=2, num_workers=1, collate_fn=Collator(tok.pad_token_id))
    batches = iter(loader)
    try:
        next(batches)
    except BadSampleError as error:
        message = str(error)
        # Drop the traceback so the loader's workers are shut down now, not by a later GC pass.
        error.__traceback__ = None
    else:
        pytest.fail("no BadSampleError")
    del batches
    assert f"{tmp_path / 'm.jsonl'}:2: image file not found" in message


def test_random_subset_is_seeded_sized_and_in_manifest_order(tmp_path):
    from mmtrain.data.dataset import random_subset

    samples = list(range(100))
    a = random_subset(samples, 10, seed=0)
    assert a == random_subset(samples, 10, seed=0) and a == sorted(a) and len(set(a)) == 10
    assert a != random_subset(samples, 10, seed=1)
    assert random_subset(samples, 100, seed=3) == samples
    with pytest.raises(ValueError, match="holds 100.*data.train_samples"):
        random_subset(samples, 101, seed=0, manifest="train.jsonl")
