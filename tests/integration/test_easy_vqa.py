"""The easy-VQA asset, prepared from its PyPI package into a fresh cache: counts, image-disjoint splits,
open-ended and 13-way multiple-choice manifests that agree, byte-identical on a second preparation."""

from __future__ import annotations

import json

import pytest

from mmtrain.assets.common import install
from mmtrain.assets.easy_vqa import ASSETS, LETTERS
from mmtrain.data.manifest import read_manifest

pytestmark = pytest.mark.slow

SPLITS = ("train", "val", "test")


def _records(folder, name):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_easy_vqa_asset(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "a"))
    folder = install(ASSETS[0])
    info = json.loads((folder / "info.json").read_text())
    answers = info["answers"]
    assert len(answers) == 13 and {"yes", "no", "circle", "rectangle", "triangle"} <= set(answers)
    counts = {split: (info["counts"][split]["questions"], info["counts"][split]["images"]) for split in SPLITS}
    assert counts["test"] == (9673, 1000)
    assert counts["train"][0] + counts["val"][0] == 38575 and counts["train"][1] + counts["val"][1] == 4000
    assert counts["val"][1] == 400

    images = {}
    for split in SPLITS:
        plain, choice = _records(folder, f"{split}.jsonl"), _records(folder, f"{split}_choice.jsonl")
        assert len(plain) == len(choice) == counts[split][0]
        images[split] = {r["image"] for r in plain}
        for a, b in zip(plain, choice):
            assert a["id"] == b["id"] and a["image"] == b["image"]
            assert b["options"] == answers and b["options"][b["answer"]] == a["conversations"][1]["value"]
            assert b["conversations"][1]["value"] == LETTERS[b["answer"]]
        assert all((folder / image).is_file() for image in images[split])
        assert len(read_manifest(folder / f"{split}_choice.jsonl")) == len(choice)
    assert not images["train"] & images["val"] and not (images["train"] | images["val"]) & images["test"]

    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "b"))
    again = install(ASSETS[0])
    for name in ("train.jsonl", "val_choice.jsonl", "info.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
