"""The Scratch media, OpenClipart and captions-mix assets: caption rules on real names and titles,
RDF metadata parsing, what is skipped and why, and the mix's held-out leak filter (no apt, no network)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmtrain.assets import captions_mix, openclipart, scratch_media
from mmtrain.assets.common import MARKER, AssetError, asset_dir, install, is_complete
from mmtrain.assets.splits import SPLITS
from mmtrain.data import read_manifest


def save_picture(path: Path, colour: tuple[int, ...], size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
    """A small picture: a coloured square on white (transparent for RGBA) so it is visible, unique per colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    background = (255, 255, 255, 0) if mode == "RGBA" else (255, 255, 255)
    image = Image.new(mode, size, background)
    image.paste(Image.new(mode, (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------- Scratch media

@pytest.mark.parametrize(("stem", "caption", "reason"), [
    ("bat1-a", "A bat.", ""),
    ("elephant1-b", "An elephant.", ""),
    ("unicorn1", "A unicorn.", ""),
    ("umbrella", "An umbrella.", ""),
    ("boy4-walking-a", "A boy walking.", ""),
    ("girl1-standing", "A girl standing.", ""),
    ("bird-flying", "A bird flying.", ""),
    ("basketball-court1-a", "A basketball court.", ""),
    ("fire-hydrant", "A fire hydrant.", ""),
    ("beach-malibu", "A beach in Malibu.", ""),
    ("sunglassF1", "Sunglasses.", ""),
    ("buttonPressed", "A pressed button.", ""),
    ("hallway_outdoors", "An outdoor hallway.", ""),
    ("route66", "A road.", ""),
    ("grand-canyon", "The Grand Canyon.", ""),
    ("cassy-dancing-1", "A person dancing.", ""),
    ("cassy-phone-1", "A person on the phone.", ""),
    ("mako-laughing", "A person laughing.", ""),
    ("lee-fan", "A person with a fan.", ""),
    ("anjuli-1", None, "person_name_only"),
    ("dan6", None, "person_name_only"),
    ("fantasy12", None, "generic_name"),
    ("gobo2", None, "character_name"),
    ("wild1", None, "unclear_name"),
    ("street-cleaner-mit", None, "misnamed"),
])
def test_scratch_captions_from_real_file_names(stem, caption, reason):
    assert scratch_media.caption_for(stem) == (caption, reason)


def test_scratch_name_words_drop_numbering_and_pose_letters():
    assert scratch_media.name_words("boy4-walking-e") == ["boy", "walking"]
    assert scratch_media.name_words("sunglassF3") == ["sunglass"]
    assert scratch_media.name_words("shark1-c") == ["shark"]
    assert scratch_media.name_words("a") == ["a"]  # a lone letter is a name, not a pose


def fake_media(root: Path) -> Path:
    """A small `Media/` tree shaped like Scratch's: pictures, a letter, a sprite, a duplicate, junk."""
    media = root / "Media"
    save_picture(media / "Costumes/Animals/bat1-a.png", (10, 10, 10))
    save_picture(media / "Costumes/Animals/bat1-b.png", (20, 20, 20))
    save_picture(media / "Costumes/Animals/cat1-a.gif", (30, 30, 30))
    save_picture(media / "Costumes/Animals/cat1-b.gif", (30, 30, 30))  # the same bytes as cat1-a
    save_picture(media / "Costumes/Animals/dog1.png", (40, 40, 40))
    save_picture(media / "Costumes/People/anjuli-1.gif", (50, 50, 50))
    save_picture(media / "Costumes/People/boy1-walking.gif", (60, 60, 60))
    save_picture(media / "Costumes/Letters/funky/a.gif", (70, 70, 70))
    (media / "Costumes/Animals/Gravity Cat.sprite").write_bytes(b"squeak object")
    (media / "Costumes/Animals/scratchthumbs.db").write_bytes(b"thumbnails")
    (media / "Costumes/Things").mkdir(parents=True)
    (media / "Costumes/Things/lamp.png").write_bytes(b"not a png")
    save_picture(media / "Backgrounds/Nature/beach-malibu.jpg", (80, 80, 80))
    save_picture(media / "Backgrounds/Nature/woods.gif", (90, 90, 90))
    save_picture(media / "Backgrounds/xy-grid.gif", (100, 100, 100))
    (media / "Sounds/Animal").mkdir(parents=True)
    (media / "Sounds/Animal/Meow.wav").write_bytes(b"RIFF")
    return media


def test_scratch_pictures_skipped_by_reason(tmp_path):
    pictures, skipped = scratch_media.find_pictures(fake_media(tmp_path))
    assert {p.id: p.caption for p in pictures} == {
        "Backgrounds/Nature/beach-malibu": "A beach in Malibu.", "Backgrounds/Nature/woods": "Woods.",
        "Backgrounds/xy-grid": "An x-y grid.", "Costumes/Animals/bat1-a": "A bat.",
        "Costumes/Animals/bat1-b": "A bat.", "Costumes/Animals/cat1-a": "A cat.", "Costumes/Animals/dog1": "A dog.",
        "Costumes/People/boy1-walking": "A boy walking.",
    }
    assert {p.id: p.category for p in pictures}["Backgrounds/xy-grid"] == "other"
    assert {p.category for p in pictures} == {"animals", "nature", "people", "other"}
    assert skipped == {"letters": 1, "sprite": 1, "unreadable": 1, "duplicate_image": 1, "person_name_only": 1,
                       "character_name": 0, "generic_name": 0, "misnamed": 0, "unclear_name": 0}


def test_scratch_build_copies_the_kept_pictures_and_writes_relative_manifests(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))
    source = fake_media(tmp_path / "package")

    def fake_download(package: str, dest: Path) -> Path:
        deb = dest / f"{package}_1.4_all.deb"
        deb.write_bytes(b"!<arch>")
        return deb

    def fake_unpack(deb: Path, root: Path) -> None:
        shutil.copytree(source, root / scratch_media.MEDIA_DIR)

    monkeypatch.setattr(scratch_media, "download_package", fake_download)
    monkeypatch.setattr(scratch_media, "deb_field", lambda deb, field: "1.4.0.6~dfsg1-6.1")
    monkeypatch.setattr(scratch_media, "unpack", fake_unpack)
    final = install(scratch_media.ASSETS[0])
    info = json.loads((final / "info.json").read_text())
    assert info["package_version"] == "1.4.0.6~dfsg1-6.1" and sum(info["counts"].values()) == 8
    records = [json.loads(line) for split in SPLITS for line in (final / f"{split}.jsonl").read_text().splitlines()]
    assert all(not Path(r["image"]).is_absolute() and r["image"].startswith("images/") for r in records)
    samples = [s for split in SPLITS for s in read_manifest(final / f"{split}.jsonl")]
    assert all(s.image.is_file() and s.image.is_relative_to(final) for s in samples)
    assert sorted(p.relative_to(final / "images").as_posix() for p in (final / "images").rglob("*") if p.is_file()) \
        == sorted(r["id"] + Path(r["image"]).suffix for r in records)
    bat_splits = {split for split in SPLITS for s in read_manifest(final / f"{split}.jsonl") if s.text == "A bat."}
    assert len(bat_splits) == 1  # pictures sharing a caption share a split
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the unpacked package is gone


# ---------------------------------------------------------------------------------------------- OpenClipart

SVG = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/"
     xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns="http://www.w3.org/2000/svg"
     width="100" height="100">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>Red   Apple</dc:title>
        <dc:description>A shiny
          red apple.</dc:description>
        <dc:subject>
          <rdf:Bag>
            <rdf:li>architetto francesco rollandin</rdf:li>
            <rdf:li></rdf:li>
            <rdf:li>fruit</rdf:li>
          </rdf:Bag>
        </dc:subject>
        <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/">
          <dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
        <dc:creator><cc:Agent><dc:title>Architetto Francesco Rollandin</dc:title></cc:Agent></dc:creator>
        <cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect width="10" height="10"/>
</svg>"""


def test_rdf_metadata_of_an_svg():
    metadata = openclipart.parse_metadata(SVG)
    assert metadata == openclipart.Metadata(
        title="Red Apple", description="A shiny red apple.", keywords=("architetto francesco rollandin", "fruit"),
        creator="Architetto Francesco Rollandin")
    assert openclipart.parse_metadata(SVG.encode()) == metadata
    assert openclipart.parse_metadata('<svg xmlns="http://www.w3.org/2000/svg"/>') == openclipart.Metadata()


WORD_LIST = """a an of on the and with
apple apples red blue bird birds butterfly butterflies tomato tomatoes football footballs helmet helmets lock locks
open opens lime limes whole bouquet bouquets flower flowers chess piece pieces dog dogs leash leashes
flag flags historic star stars jigsaw jigsaws pear pears contour contours bat bats dinosaur dinosaurs reptile
rounded cloudy led LED man men singing woman women snowman snowmen icon icons hotel hotels room rooms
umbrella umbrellas unicorn unicorns euro euros up doc what's collection collections part parts flat
Jupiter Dino Canada Alberta Belarus Nevada Ukrainian""".split()


@pytest.fixture(scope="module")
def words() -> openclipart.Words:
    return openclipart.Words(WORD_LIST)


@pytest.mark.parametrize(("path", "title", "keywords", "creator", "uses", "caption", "reason"), [
    ("food/tomato_nicu_buculei_01.png", "tomato 01", (), "", 1, "A drawing of a tomato.", ""),
    ("food/red_apple_01.png", "Red Apple", (), "", 1, "A drawing of a red apple.", ""),
    ("animals/bugs/farfalla_01.png", "Farfalla - Butterfly", (), "", 1, "A drawing of a butterfly.", ""),
    ("recreation/football_helmet_01.png", "Football Helmet", (), "", 1, "A drawing of a football helmet.", ""),
    ("food/fruit/lime_whole_ganson.png", "Lime (Whole)", (), "", 1, "A drawing of a lime.", ""),
    ("plants/bouquet_01.png", "bouquet of flowers", (), "", 1, "A drawing of a bouquet of flowers.", ""),
    ("recreation/chesspieces.png", "Chess pieces", (), "", 1, "A drawing of chess pieces.", ""),
    ("animals/dog_on_leash_01.png", "Dog_on_Leash", (), "", 1, "A drawing of a dog on leash.", ""),
    ("people/man_singing.png", "man singing", (), "", 1, "A drawing of a man singing.", ""),
    ("people/snowman.png", "snowman", (), "", 1, "A drawing of a snowman.", ""),
    ("recreation/umbrella.png", "Umbrella", (), "", 1, "A drawing of an umbrella.", ""),
    ("recreation/unicorn.png", "unicorn", (), "", 1, "A drawing of a unicorn.", ""),
    ("tools/lock_-_open_01.png", "Lock - Open", (), "", 1, None, "ambiguous_title"),
    ("food/fruit/mela_01.png", "architetto -- mela", ("fruit",), "", 1, "A drawing of a fruit.", ""),
    ("food/mela_02.png", "architetto -- mela", ("fruit",), "", 1, None, "not_english"),
    ("animals/birds/acquila_01.png", "Acquila", ("bird",), "", 1, "A drawing of a bird.", ""),
    ("animals/birds/acquila_02.png", "Acquila", ("animal",), "", 1, None, "not_english"),
    ("animals/birds/acquila_03.png", "Acquila reptile", ("bird",), "", 1, None, "not_english"),  # says something
    ("animals/dinosaurs/dino_01.png", "Dino", ("dinosaur",), "", 1, "A drawing of a dinosaur.", ""),
    ("animals/dino_02.png", "Dino", ("dinosaur",), "", 1, None, "name_only"),
    ("geography/jupiter_01.png", "Jupiter", (), "", 1, None, "name_only"),
    ("animals/architetto_01.png", "Architetto Francesco Rollandin", (), "Architetto Francesco Rollandin", 1,
     None, "no_title"),
    ("signs_and_symbols/led/led_rounded_h_orange.png", "LED Rounded H (Orange)", (), "", 1, None, "not_a_noun"),
    ("signs_and_symbols/weather/cloudy.png", "cloudy", (), "", 1, None, "not_a_noun"),
    ("food/vegetables/doc.png", "What's Up, Doc?", ("vegetable",), "", 1, None, "exclamation"),
    ("computer/icons/hotel_02.png", "Hotel Icon Collection In Room", (), "", 1, None, "collection_title"),
    ("computer/icons/flat-theme/action/flower.png", "Part of the Flat Icon Collection (2004)", (), "", 20,
     None, "series_title"),
    ("shapes/stars/star_41pt14step.png", "gramastar", ("stars", "shapes"), "", 20, "A drawing of a star.", ""),
    ("food/fruit/apple.png", "Clipart by Nicu Buculei - pear", (), "Nicu Buculei", 2, "A drawing of an apple.", ""),
    ("food/fruit/pear.png", "Clipart by Nicu Buculei - pear", (), "Nicu Buculei", 1, "A drawing of a pear.", ""),
    ("shapes/jigsaw/jigsaw_blue_03.png", "Clipart by Nicu Buculei - jigsaw_red_10", (), "Nicu Buculei", 2,
     "A drawing of a blue jigsaw.", ""),
    ("animals/contour_bat.png", "Clipart by Nicu Buculei - contour_chipmunk", (), "Nicu Buculei", 2,
     "A drawing of an outline of a bat.", ""),
    ("shapes/callouts/cloudy01.png", "Clipart by Nicu Buculei - w_cloud", (), "Nicu Buculei", 2, None, "upload_title"),
    ("signs_and_symbols/flags/america/canada/canada_alberta.png", "Canada - Alberta", (), "", 1,
     "A drawing of the flag of Alberta.", ""),
    ("signs_and_symbols/flags/historic/belarus_historic.png", "Historic - Belarus", (), "", 1,
     "A drawing of a historic flag of Belarus.", ""),
    ("signs_and_symbols/flags/america/united_states/usa_nevada.png", "USA Nevada", (), "", 1,
     "A drawing of the flag of Nevada.", ""),
    ("signs_and_symbols/flags/america/canada.png", "", (), "", 1, "A drawing of the flag of Canada.", ""),
    ("signs_and_symbols/flags/europe/ukraine.png", "Ukrainian flag", (), "", 1, "A drawing of a Ukrainian flag.", ""),
    ("signs_and_symbols/flags/asia/sri_lanka.png", "Sri Lanka", (), "", 1, None, "not_english"),
    ("unsorted/empty.png", "", (), "", 58, None, "no_title"),
])
def test_openclipart_captions_from_real_titles(words, path, title, keywords, creator, uses, caption, reason):
    metadata = openclipart.Metadata(title=title, keywords=keywords, creator=creator)
    found = openclipart.caption_for(Path(path), metadata, Counter({title: uses}), words)
    assert found == (caption, reason)


@pytest.mark.parametrize(("text", "expected"), [
    ("tomato 01", ["tomato"]), ("boat1", ["boat"]), ("Elefante01", ["Elefante"]), ("BlueMan#101", ["Blue", "Man"]),
    ("star_41pt14step", ["star"]), ("R16 sibmission", ["sibmission"]), ("microchip v.2", ["microchip"]),
    ("svg_globe_green", ["globe", "green"]), ("Heart Left-Highlight", ["Heart", "Left", "Highlight"]),
    ("What's Up", ["What's", "Up"]),
])
def test_openclipart_words_of_titles_and_file_names(text, expected):
    assert openclipart.split_words(text) == expected


def test_articles_and_heads(words):
    assert all(openclipart.starts_with_vowel_sound(w) for w in ("apple", "LED", "umbrella", "under", "owl"))
    assert not any(openclipart.starts_with_vowel_sound(w) for w in ("unicorn", "Ukrainian", "euro", "PC", "one"))
    assert openclipart.head_word(["bouquet", "of", "flowers"]) == "bouquet"
    assert openclipart.head_word(["man", "singing"]) == "man"
    assert openclipart.with_article(["chess", "pieces"], words) == "chess pieces"
    assert openclipart.with_article(["the", "flag"], words) == "the flag"
    assert openclipart.evenly_spread(list(range(10)), 4) == [0, 2, 5, 7] and openclipart.evenly_spread([1], 4) == [1]


def write_drawing(png_dir: Path, svg_dir: Path, relative: str, title: str, colour: tuple[int, ...],
                  keywords: tuple[str, ...] = (), size: tuple[int, int] = (32, 32)) -> Path:
    """A PNG under `png_dir` and its SVG (only the metadata) under `svg_dir`."""
    png = save_picture(png_dir / relative, colour, size, mode="RGBA")
    bag = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    svg = SVG.replace("Red   Apple", title).replace(
        "<rdf:li>architetto francesco rollandin</rdf:li>\n            <rdf:li></rdf:li>\n            "
        "<rdf:li>fruit</rdf:li>", bag)
    (svg_dir / relative).with_suffix(".svg").parent.mkdir(parents=True, exist_ok=True)
    (svg_dir / relative).with_suffix(".svg").write_text(svg)
    return png


@pytest.fixture()
def clipart(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A small png/svg tree shaped like the packages', with one drawing of each kind of skip."""
    png, svg = tmp_path / "png", tmp_path / "svg"
    write_drawing(png, svg, "food/fruit/apple_01.png", "Red Apple", (200, 0, 0, 255))
    write_drawing(png, svg, "food/tomato_01.png", "tomato 01", (210, 0, 0, 255))
    write_drawing(png, svg, "food/tomato_02.png", "tomato 02", (210, 0, 0, 255))  # the same picture again
    write_drawing(png, svg, "food/mela_01.png", "Mela", (220, 0, 0, 255), keywords=("food",))
    write_drawing(png, svg, "food/dot_01.png", "Red Apple", (230, 0, 0, 255), size=(8, 8))
    write_drawing(png, svg, "food/ghost_01.png", "Red Apple", (255, 255, 255, 0))  # nothing visible on white
    for index in range(5):
        write_drawing(png, svg, f"shapes/stars/star_{index}.png", "gramastar", (0, 0, 40 * index, 255),
                      keywords=("stars",))
    (png / "food/fruit/no_svg.png").write_bytes((png / "food/fruit/apple_01.png").read_bytes())
    (png / "plants").mkdir()
    (png / "plants/apple_01.png").symlink_to("../food/fruit/apple_01.png")
    monkeypatch.setattr(openclipart, "SERIES_MIN", 5)
    monkeypatch.setattr(openclipart, "MAX_PER_CAPTION", 3)
    return png, svg


def test_openclipart_drawings_skipped_by_reason(clipart, words):
    drawings, skipped = openclipart.find_drawings(*clipart, vocabulary=words)
    assert [(d.id, d.caption, d.category) for d in drawings] == [
        ("food/fruit/apple_01", "A drawing of a red apple.", "food"),
        ("food/tomato_01", "A drawing of a tomato.", "food"),
        ("shapes/stars/star_0", "A drawing of a star.", "shapes"),
        ("shapes/stars/star_1", "A drawing of a star.", "shapes"),
        ("shapes/stars/star_3", "A drawing of a star.", "shapes"),
    ]
    assert skipped == {"blank_on_white": 1, "caption_cap": 2, "duplicate_image": 1, "linked_copy": 1, "no_svg": 1,
                       "not_english": 1, "too_small": 1}


def test_openclipart_build_records_versions_counts_and_skips(clipart, words, tmp_path, monkeypatch):
    word_file = tmp_path / "words"
    word_file.write_text("\n".join(WORD_LIST) + "\n")
    monkeypatch.setattr(openclipart, "PNG_DIR", clipart[0])
    monkeypatch.setattr(openclipart, "SVG_DIR", clipart[1])
    monkeypatch.setattr(openclipart, "WORDS_FILE", word_file)
    monkeypatch.setattr(openclipart, "apt_install", lambda packages: None)
    monkeypatch.setattr(openclipart, "debian_package_version", lambda package: "1:0.18+dfsg-19")
    staging = tmp_path / "staging"
    staging.mkdir()
    openclipart.build(staging)
    info = json.loads((staging / "info.json").read_text())
    assert info["packages"] == dict.fromkeys(("openclipart-png", "openclipart-svg", "wamerican"), "1:0.18+dfsg-19")
    assert sum(info["counts"].values()) == 5 and info["skipped"]["caption_cap"] == 2
    records = {split: [json.loads(line) for line in (staging / f"{split}.jsonl").read_text().splitlines()]
               for split in SPLITS}
    assert sorted(r["image"] for split in SPLITS for r in records[split]) \
        == sorted(str(d.image) for d in openclipart.find_drawings(*clipart, vocabulary=words)[0])
    assert len({split for split in SPLITS for r in records[split] if r["text"] == "A drawing of a star."}) == 1


def test_openclipart_without_the_word_list_says_what_to_install(tmp_path):
    with pytest.raises(AssetError, match=r"words does not exist; install the Debian package wamerican"):
        openclipart.Words.load(tmp_path / "words")


# ---------------------------------------------------------------------------------------------- captions-mix

def fake_source(name: str, records: dict[str, list[tuple[str, str, tuple[int, ...]]]], relative: bool = False) -> Path:
    """A prepared source asset in the cache: pictures, `{split}.jsonl` and the completion marker.

    `records` maps a split to (id, caption, picture colour) triples; equal colours give equal bytes.
    """
    folder = asset_dir(captions_mix.SOURCES[name])
    for split in SPLITS:
        lines = []
        for record_id, text, colour in records.get(split, []):
            image = save_picture(folder / "images" / f"{record_id}.png", colour)
            path = image.relative_to(folder).as_posix() if relative else str(image)
            lines.append(json.dumps({"id": record_id, "image": path, "text": text, "category": "c"}))
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    (folder / MARKER).write_text(json.dumps({"name": name, "version": captions_mix.SOURCES[name].version}))
    return folder


RED, GREEN, BLUE, GREY, TEAL = (200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90), (0, 120, 120)


@pytest.fixture()
def sources(tmp_path, monkeypatch) -> dict[str, Path]:
    """Three small prepared sources; some pictures are the same bytes under other names and splits."""
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))
    return {
        "tuxpaint": fake_source("tuxpaint", {
            "train": [("t-train", "A yak.", GREY)], "val": [("t-val", "A cat.", GREEN)],
            "test": [("t-test", "A frog.", RED)]}),
        "scratch-media": fake_source("scratch-media", {
            "train": [("s-red", "A frog.", RED), ("s-green", "A cat.", GREEN), ("s-grey", "A dog.", GREY),
                      ("s-teal", "A bus.", TEAL)],
            "val": [("s-val-red", "A frog.", RED), ("s-val-blue", "A bat.", BLUE)],
            "test": [("s-test", "A bee.", BLUE)]}, relative=True),
        "openclipart": fake_source("openclipart", {
            "train": [("o-teal", "A drawing of a bus.", TEAL)], "val": [("o-val", "A drawing of a hat.", (1, 2, 3))],
            "test": [("o-test", "A drawing of a cup.", (4, 5, 6))]}),
    }


def test_mix_keeps_source_splits_and_drops_held_out_pictures_from_train_and_val(sources):
    final = install(captions_mix.ASSETS[0])
    kept = {split: [json.loads(line) for line in (final / f"{split}.jsonl").read_text().splitlines()]
            for split in SPLITS}
    assert [r["id"] for r in kept["train"]] == ["tuxpaint:t-train", "scratch-media:s-teal"]
    assert [r["id"] for r in kept["val"]] == ["tuxpaint:t-val", "openclipart:o-val"]
    assert [r["id"] for r in kept["test"]] == ["tuxpaint:t-test", "scratch-media:s-test", "openclipart:o-test"]
    assert all(r["category"] == r["id"].split(":")[0] + "/c" for split in SPLITS for r in kept[split])
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for split in SPLITS for r in kept[split])
    assert kept["train"][1]["image"] == str((sources["scratch-media"] / "images" / "s-teal.png").resolve())
    info = json.loads((final / "info.json").read_text())
    assert info["counts"] == {"train": {"tuxpaint": 1, "scratch-media": 1, "openclipart": 0},
                              "val": {"tuxpaint": 1, "scratch-media": 0, "openclipart": 1},
                              "test": {"tuxpaint": 1, "scratch-media": 1, "openclipart": 1}}
    assert info["dropped"] == {
        "train": {"scratch-media": {"same_as_heldout": 2, "duplicate": 1}, "openclipart": {"duplicate": 1}},
        "val": {"scratch-media": {"same_as_test": 2}},
    }
    assert set(info["sources_sha256"]) == {"tuxpaint", "scratch-media", "openclipart"}
    assert [s.text for s in read_manifest(final / "test.jsonl")] == ["A frog.", "A bee.", "A drawing of a cup."]


def test_mix_without_a_source_names_what_to_prepare(sources):
    (sources["openclipart"] / MARKER).unlink()
    with pytest.raises(AssetError, match=r"prepare `openclipart` first \(`mmtrain assets prepare openclipart`\)"):
        install(captions_mix.ASSETS[0])
    assert not is_complete(captions_mix.ASSETS[0])


def test_mix_names_a_missing_source_picture(sources):
    (sources["tuxpaint"] / "images" / "t-val.png").unlink()
    with pytest.raises(AssetError, match=r"tuxpaint lists the picture .*t-val.png, which does not exist"):
        install(captions_mix.ASSETS[0])


def test_new_assets_are_registered():
    from mmtrain.assets.registry import all_assets

    assets = all_assets()
    assert {"scratch-media", "openclipart", "captions-mix"} <= set(assets)
    assert assets["captions-mix"].requires == ("tuxpaint", "scratch-media", "openclipart")
