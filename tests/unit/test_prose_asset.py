"""The `prose` asset: sentences from Debian's licence texts as plain texts and text-only instructions."""

from __future__ import annotations

import json

from mmtrain.assets import prose
from mmtrain.data.manifest import read_manifest


def test_sentences_are_rejoined_filtered_and_split():
    text = ("This License applies to any program or other work which contains\na notice placed by the "
            "copyright holder. Short one.\n\n  1. You may copy and distribute verbatim copies of the "
            "Program's source code as you receive it; THE END")
    found = prose.sentences(text)
    assert found[0] == ("This License applies to any program or other work which contains a notice placed by "
                        "the copyright holder.")
    assert "Short one." not in found  # under 8 words
    assert all(prose.MIN_WORDS <= len(s.split()) <= prose.MAX_WORDS for s in found)


def test_continuation_sample_splits_a_sentence_in_half():
    sample = prose.continuation_sample("one two three four five six seven eight nine", 3)
    human, gpt = sample["conversations"]
    assert sample["image"] is None and sample["id"] == "prose-00003"
    assert human["value"] == f"{prose.INSTRUCTION} one two three four" and gpt["value"] == "five six seven eight nine"


def test_build_writes_disjoint_splits_readable_as_text_only_manifests(tmp_path):
    prose.build(tmp_path)
    info = json.loads((tmp_path / "info.json").read_text())
    texts = {name: (tmp_path / f"{name}.txt").read_text().splitlines() for name in ("train", "val", "test")}
    assert sum(info["counts"].values()) >= 300
    assert {name: len(lines) for name, lines in texts.items()} == info["counts"]
    assert not set(texts["train"]) & (set(texts["val"]) | set(texts["test"]))
    samples = read_manifest(tmp_path / "val.jsonl")
    assert len(samples) == info["counts"]["val"] and not any(s.has_image for s in samples)
    again = tmp_path / "again"
    again.mkdir()
    prose.build(again)
    assert (again / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()
