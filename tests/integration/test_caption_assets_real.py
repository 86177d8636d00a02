"""The real Scratch media, OpenClipart and captions-mix assets, prepared from the Debian packages:
counts, pictures that open, short captions, disjoint splits, the mix's leak filter, reproducibility."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from mmtrain.assets import captions_mix, openclipart, scratch_media
from mmtrain.assets.splits import SPLITS
from mmtrain.data import load_image, read_manifest

pytestmark = pytest.mark.slow
CAPTION_SETS = ("scratch-media", "openclipart")
MAX_WORDS = 12


@pytest.fixture(scope="module")
def prepared() -> dict[str, Path]:
    """The three captioning assets and their sources in the shared cache: prepared once per machine."""
    from mmtrain.assets import prepare

    folders, seconds = {}, {}
    for name in ("tuxpaint", *CAPTION_SETS, "captions-mix"):
        start = time.perf_counter()
        folders[name] = prepare(name)
        seconds[name] = round(time.perf_counter() - start, 2)
    print("preparation seconds (0 when already prepared):", seconds)
    return folders


def _records(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_counts_are_those_of_the_real_packages(prepared) -> None:
    scratch = json.loads((prepared["scratch-media"] / "info.json").read_text())
    assert 280 <= sum(scratch["counts"].values()) <= 310  # 342 pictures less letters' folder, names, sprites
    assert scratch["skipped"]["letters"] == 350 and scratch["skipped"]["sprite"] >= 25
    assert set().union(*(scratch["categories"][split] for split in SPLITS)) == {
        "animals", "fantasy", "people", "things", "transportation", "indoors", "nature", "outdoors", "sports", "other"}
    assert scratch["package_version"]

    clipart = json.loads((prepared["openclipart"] / "info.json").read_text())
    assert 1900 <= sum(clipart["counts"].values()) <= 2500  # of 8,121 PNGs, 6,900 distinct files
    assert clipart["skipped"]["linked_copy"] >= 1200 and clipart["skipped"]["series_title"] >= 1500
    assert clipart["skipped"]["not_english"] >= 400 and clipart["skipped"]["too_large"] >= 10
    assert all(clipart["packages"].values())
    for split in SPLITS:
        assert len(clipart["categories"][split]) >= 15, split

    mix = json.loads((prepared["captions-mix"] / "info.json").read_text())
    tux = json.loads((prepared["tuxpaint"] / "info.json").read_text())
    for split in SPLITS:
        expected = {"tuxpaint": tux["counts"][split], "scratch-media": scratch["counts"][split],
                    "openclipart": clipart["counts"][split]}
        dropped = mix["dropped"].get(split, {})
        assert mix["counts"][split] == {name: count - sum(dropped.get(name, {}).values())
                                        for name, count in expected.items()}
    assert mix["counts"]["test"] == {"tuxpaint": tux["counts"]["test"], "scratch-media": scratch["counts"]["test"],
                                     "openclipart": clipart["counts"]["test"]}
    assert sum(mix["totals"].values()) >= 3 * sum(tux["counts"].values())


def test_every_picture_opens_and_every_caption_is_a_short_sentence(prepared) -> None:
    for name in (*CAPTION_SETS, "captions-mix"):
        for split in SPLITS:
            samples = read_manifest(prepared[name] / f"{split}.jsonl")
            assert samples, (name, split)
            for sample in samples:
                assert sample.image is not None and sample.image.is_absolute() and sample.image.is_file()
                assert sample.text and sample.text.strip() == sample.text
                if name != "captions-mix":  # the mix also holds Tux Paint's own (sometimes long) captions
                    words = sample.text.split()
                    assert 1 <= len(words) <= MAX_WORDS and sample.text[0].isupper() and sample.text.endswith("."), \
                        sample.text
    for name in CAPTION_SETS:  # the mix's pictures are these and Tux Paint's
        images = {s.image for split in SPLITS for s in read_manifest(prepared[name] / f"{split}.jsonl")}
        for image in sorted(images):
            picture = load_image(image)
            assert min(picture.size) >= 16 and max(picture.size) <= openclipart.MAX_SIDE, image


def test_splits_are_disjoint_by_image_and_caption(prepared) -> None:
    for name in CAPTION_SETS:
        image_split: dict[str, str] = {}
        caption_split: dict[str, str] = {}
        for split in SPLITS:
            for record in _records(prepared[name], split):
                assert image_split.setdefault(record["image"], split) == split, (name, record["image"])
                assert caption_split.setdefault(record["text"], split) == split, (name, record["text"])
    digests = {split: [hashlib.sha256(Path(r["image"]).read_bytes()).hexdigest()
                       for r in _records(prepared["captions-mix"], split)] for split in SPLITS}
    for split, later in (("train", ("val", "test")), ("val", ("test",))):
        for other in later:
            assert not set(digests[split]) & set(digests[other]), (split, other)
    for split in SPLITS:
        assert len(digests[split]) == len(set(digests[split])), split


def test_preparing_again_gives_identical_files(prepared, tmp_path) -> None:
    for name, build in (("scratch-media", scratch_media.build), ("openclipart", openclipart.build),
                        ("captions-mix", captions_mix.build)):
        again = tmp_path / name
        again.mkdir()
        build(again)
        for file in ("info.json", *(f"{split}.jsonl" for split in SPLITS)):
            assert (again / file).read_bytes() == (prepared[name] / file).read_bytes(), (name, file)
