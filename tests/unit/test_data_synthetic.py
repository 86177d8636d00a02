"""Tests for mmtrain.data.synthetic: the shapes dataset and the tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mmtrain.data.images import load_image
from mmtrain.data.manifest import read_manifest
from mmtrain.data.synthetic import COLOURS, SHAPES, main, make_caption_dataset, make_tiny_tokenizer


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = make_caption_dataset(tmp_path / "a", num_images=20, image_size=16, seed=3)
    second = make_caption_dataset(tmp_path / "b", num_images=20, image_size=16, seed=3)
    other = make_caption_dataset(tmp_path / "c", num_images=20, image_size=16, seed=4)
    assert first == tmp_path / "a" / "train.jsonl"
    assert first.read_text() == second.read_text()
    assert (tmp_path / "a" / "val.jsonl").read_text() == (tmp_path / "b" / "val.jsonl").read_text()
    for name in sorted(path.name for path in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert first.read_text() != other.read_text()


def test_split_is_disjoint_and_complete(tmp_path: Path) -> None:
    train = make_caption_dataset(tmp_path, num_images=50, image_size=16, seed=0)
    train_ids = {record["id"] for record in _records(train)}
    val_ids = {record["id"] for record in _records(tmp_path / "val.jsonl")}
    assert not train_ids & val_ids
    assert len(train_ids | val_ids) == 50
    assert len(val_ids) == 6
    assert sorted(val_ids) != sorted(train_ids | val_ids)[-6:]  # a random split, not the tail
    assert sorted(val_ids) != sorted(train_ids | val_ids)[:6]
    assert len(read_manifest(train)) == 44


def test_images_match_their_captions(tmp_path: Path) -> None:
    train = make_caption_dataset(tmp_path, num_images=12, image_size=24, seed=1)
    shapes_seen = set()
    for sample in read_manifest(train):
        assert sample.text is not None and sample.image is not None
        words = sample.text.rstrip(".").split()
        foreground, shape, background = words[1], words[2], words[5]
        assert shape in SHAPES and foreground != background
        image = load_image(sample.image)
        assert image.size == (24, 24)
        colours = {colour for _, colour in image.getcolors()}
        assert colours == {COLOURS[foreground], COLOURS[background]}
        shapes_seen.add(shape)
    assert len(shapes_seen) > 1


def test_tiny_tokenizer(tmp_path: Path) -> None:
    out = make_tiny_tokenizer(["a red circle on a blue background."] * 20, tmp_path / "tok", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= 300
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]) == [
        "<s>", "</s>", "<pad>", "<unk>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    ids = tok.encode("a red circle", add_special_tokens=False)
    assert tok.decode(ids) == "a red circle"
    assert len(ids) < len("a red circle")  # merges were learnt
    assert tok.decode(tok.encode("ünïcode?", add_special_tokens=False)) == "ünïcode?"  # byte fallback
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_tokenizer(["x"], tmp_path / "small", vocab_size=100)


def test_cli_writes_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synthetic"
    assert main([str(out), "--num-images", "10", "--image-size", "16", "--seed", "2"]) == 0
    assert (out / "train.jsonl").is_file() and (out / "val.jsonl").is_file()
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    caption = _records(out / "train.jsonl")[0]["text"]
    assert tok.unk_token_id not in tok.encode(caption, add_special_tokens=False)
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main([str(out), "--num-images", "30"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp
    assert len(_records(out / "train.jsonl")) + len(_records(out / "val.jsonl")) == 10
