"""Scratch 1.4's media library as a captioned-picture data asset: stage backgrounds and sprite costumes.

The Debian package `scratch` ships the pictures under `/usr/share/scratch/Media/`: `Backgrounds/`
(photos and drawings of places, in Indoors, Nature, Outdoors and Sports) and `Costumes/` (drawn and
photographed sprites in Animals, Fantasy, People, Things and Transportation). Installing the
package would pull in a Squeak VM, so it is only downloaded (`apt-get download`) and unpacked
(`dpkg-deb -x`) into a scratch folder, and the pictures are copied into the asset's `images/`.

The pictures carry no captions: each caption is made from the file name, the only description
Scratch gives them (`Costumes/Animals/bat1-a.png` -> "A bat."). Rules:

* the name is cut into lower-case words at `-`, `_`, spaces and lower-to-upper case changes;
  numbers ending a word (`bat1`, `route66`) and single-letter pose words ending the name
  (`-a`, `-b`: frames of one animation) are dropped, so `boy4-walking-a` is "boy walking";
* names whose words are not a caption as they stand (compounds, places, abbreviations, plurals,
  `beach-malibu`, `palmtree`, `mic`, `sunglassF1`) are phrased by the fixed table `PHRASES`;
* a person's first name (`cassy-dancing-1`) says nothing a picture shows: with a pose word it
  becomes "A person dancing.", alone (`anjuli-1`) the picture is skipped (`person_name_only`);
* a trailing pose word (standing, walking, laughing, ...) follows the noun: "A boy walking.";
* names that cannot make an honest caption are skipped and counted by the reason in `SKIP`:
  `generic_name` (`fantasy1`..`fantasy14`: the folder's name, numbered), `character_name` (`gobo`,
  a Scratch character), `unclear_name` (`wild`), `misnamed` (`street-cleaner-mit` shows an
  ice resurfacer);
* `Costumes/Letters/` (ten fonts' glyphs of 0-9 and A-Z) is skipped: its 350 pictures of single
  letters and digits would outnumber everything else (`letters`);
* `.sprite` files (Scratch objects, not pictures) and `scratchthumbs.db` are not pictures; the
  sprites are counted (`sprite`), as are pictures Pillow cannot read (`unreadable`) and pictures
  whose bytes equal an earlier one's in path order (`duplicate_image`).

Category = the folder the picture is in, lower-case ("animals", "nature"); `xy-grid.gif` at the top
of `Backgrounds/` gets "other". Pictures sharing a caption ("A cat.") are put in the same split,
stratified by category. Writes `images/` (the kept pictures, under their path below `Media/`),
`{train,val,test}.jsonl` (caption records, image paths relative to the manifest, `id` = the path
below `Media/` without suffix) and `info.json` (package version, counts, skipped by reason).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmtrain.assets.common import Asset, AssetError, deb_field, download_package, scratch_dir, unpack
from mmtrain.assets.splits import split_by_caption, write_caption_splits, write_json

PACKAGE = "scratch"
MEDIA_DIR = Path("usr/share/scratch/Media")
"""Where the package puts the media library, relative to the root it is unpacked into."""
PICTURE_FOLDERS = ("Backgrounds", "Costumes")
LETTERS_FOLDER = Path("Costumes/Letters")
IMAGES_DIR = "images"
SEED = 0
RASTER_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".bmp")
SPRITE_SUFFIX = ".sprite"

PERSON_NAMES = frozenset({
    "amon", "anjuli", "anna", "calvrett", "cassy", "chamak", "dan", "ed", "jay", "jodi", "lee", "mako",
    "marissa", "nathan", "nina", "paul", "sam",
})
"""First names of the people photographed for Scratch's `People` costumes."""

POSES: dict[str, str] = {
    "standing": "standing", "walking": "walking", "sitting": "sitting", "running": "running",
    "jumping": "jumping", "laughing": "laughing", "shouting": "shouting", "shrugging": "shrugging",
    "dancing": "dancing", "thinking": "thinking", "crouching": "crouching", "screaming": "screaming",
    "flying": "flying", "waving": "waving", "chillin": "relaxing", "phone": "on the phone",
    "stop": "signalling stop",
}
"""Pose words that may end a name, and how the caption says them."""

SKIP: dict[str, str] = {
    "fantasy": "generic_name",
    "gobo": "character_name",
    "wild": "unclear_name",
    "street cleaner mit": "misnamed",
}
"""Names (as `name_words` joins them) that make no honest caption, and the reason counted."""

PHRASES: dict[str, str] = {
    "all sports mural": "a sports mural",
    "atom playground": "a playground",
    "bananas": "bananas",
    "beach malibu": "a beach in Malibu",
    "beachball": "a beach ball",
    "bench with view": "a bench with a view",
    "berkeley mural": "a mural in Berkeley",
    "boycurly": "a boy with curly hair",
    "boyshorts": "a boy in shorts",
    "building at mit": "a building at MIT",
    "building fireproof": "a fireproof building",
    "button pressed": "a pressed button",
    "car blue": "a blue car",
    "car bug": "a Volkswagen Beetle",
    "car cow": "a car with cow spots",
    "cheesy puffs": "cheese puffs",
    "city with water": "a city by the water",
    "flower vase": "a vase of flowers",
    "flowers": "flowers",
    "football run": "a football player running",
    "football stand": "a football player standing",
    "garden rock": "a rock in a garden",
    "girl basketball": "a girl with a basketball",
    "graffiti": "graffiti",
    "grand canyon": "the Grand Canyon",
    "hair": "a wig",
    "hallway outdoors": "an outdoor hallway",
    "houses": "houses",
    "lee fan": "a person with a fan",
    "lego": "a Lego brick",
    "magiccarpet": "a magic carpet",
    "manhole": "a manhole cover",
    "mic": "a microphone",
    "monkeyking": "the Monkey King",
    "moon": "the Moon",
    "mural faro": "a mural",
    "night city": "a city at night",
    "night city with street": "a city street at night",
    "palmtree": "a palm tree",
    "partyhat": "a party hat",
    "pool": "a swimming pool",
    "roundman": "a round man",
    "route": "a road",
    "royalperson": "a royal person",
    "sail boat": "a sailboat",
    "silos": "silos",
    "soccer": "a soccer ball",
    "spotlight stage": "a stage with spotlights",
    "squaregirl": "a square girl",
    "squareguy": "a square guy",
    "stars": "stars",
    "sun": "the sun",
    "sunglass": "sunglasses",
    "tennisball": "a tennis ball",
    "thai dancer": "a Thai dancer",
    "the movies": "a movie theater",
    "the movies inside": "the inside of a movie theater",
    "train tracks": "train tracks",
    "tug boat": "a tugboat",
    "underwater": "an underwater scene",
    "water and rocks": "water and rocks",
    "wizardhat": "a wizard hat",
    "womanbun": "a woman with a hair bun",
    "womanwaving": "a woman waving",
    "woods": "woods",
    "woods and bench": "woods and a bench",
    "xy grid": "an x-y grid",
}
"""Names (as `name_words` joins them) whose words are not a caption as they stand -> the caption's words."""


@dataclass(frozen=True)
class Picture:
    """One captioned picture of the media library."""

    id: str
    """Path below `Media/` without suffix, e.g. `Costumes/Animals/bat1-a`."""
    source: Path
    """The file in the unpacked package."""
    relative: Path
    """Path below `Media/`, kept below the asset's `images/`."""
    caption: str
    category: str


def name_words(stem: str) -> list[str]:
    """The lower-case words of a file name, without numbering or a final pose letter.

    `boy4-walking-a` -> `["boy", "walking"]`, `sunglassF1` -> `["sunglass"]`, `route66` -> `["route"]`.
    """
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    words = [re.sub(r"\d+$", "", word).lower() for word in re.split(r"[-_\s]+", spaced)]
    words = [word for word in words if word]
    while len(words) > 1 and len(words[-1]) == 1:
        words.pop()
    return words


def with_article(noun: str) -> str:
    """`noun` with "a" or "an" before it, by its first sound as English spells it in these names."""
    starts_with_vowel_sound = noun[:1] in "aeiou" and not noun.startswith(("uni", "use", "eu"))
    return f"{'an' if starts_with_vowel_sound else 'a'} {noun}"


def caption_for(stem: str) -> tuple[str | None, str]:
    """The caption of a picture named `stem`, or None and the reason it has none.

    Returns:
        `(caption, "")` or `(None, reason)` with reason one of the `SKIP` reasons or `person_name_only`.
    """
    words = name_words(stem)
    key = " ".join(words)
    if not words:
        return None, "unclear_name"
    if key in SKIP:
        return None, SKIP[key]
    if key in PHRASES:
        phrase = PHRASES[key]
    else:
        if words[0] in PERSON_NAMES:
            if len(words) == 1:
                return None, "person_name_only"
            words = ["person", *words[1:]]
        poses: list[str] = []
        while len(words) > 1 and words[-1] in POSES:
            poses.insert(0, POSES[words.pop()])
        phrase = " ".join([with_article(" ".join(words)), *poses])
    return phrase[0].upper() + phrase[1:] + ".", ""


def category_of(relative: Path) -> str:
    """`Costumes/Animals/bat1-a.png` -> "animals"; a picture directly in `Backgrounds/` -> "other"."""
    return relative.parts[1].lower() if len(relative.parts) > 2 else "other"


def find_pictures(media: Path) -> tuple[list[Picture], dict[str, int]]:
    """Every captioned, readable, distinct picture under `media` (the unpacked `Media/`), in path order.

    Returns:
        The pictures, and counts of the skipped files by reason (see the module docstring).
    """
    skipped = dict.fromkeys(("letters", "sprite", "unreadable", "duplicate_image", "person_name_only",
                             *sorted(set(SKIP.values()))), 0)
    pictures: list[Picture] = []
    seen_digests: set[str] = set()
    files = sorted(p for folder in PICTURE_FOLDERS for p in (media / folder).rglob("*") if p.is_file())
    for path in files:
        relative = path.relative_to(media)
        suffix = path.suffix.lower()
        if suffix == SPRITE_SUFFIX:
            skipped["sprite"] += 1
            continue
        if suffix not in RASTER_SUFFIXES:
            continue  # thumbnail databases
        if LETTERS_FOLDER in relative.parents:
            skipped["letters"] += 1
            continue
        caption, reason = caption_for(path.stem)
        if caption is None:
            skipped[reason] += 1
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen_digests:
            skipped["duplicate_image"] += 1
            continue
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError):
            skipped["unreadable"] += 1
            continue
        seen_digests.add(digest)
        pictures.append(Picture(id=relative.with_suffix("").as_posix(), source=path, relative=relative,
                                caption=caption, category=category_of(relative)))
    return pictures, skipped


def build(staging: Path) -> None:
    """Downloads and unpacks the package, copies the kept pictures into `staging` and writes manifests."""
    with scratch_dir("scratch-media.") as work:
        deb = download_package(PACKAGE, work)
        version = deb_field(deb, "Version")
        unpack(deb, work / "root")
        media = work / "root" / MEDIA_DIR
        if not all((media / folder).is_dir() for folder in PICTURE_FOLDERS):
            raise AssetError(f"{deb.name} has no {MEDIA_DIR}/{{{','.join(PICTURE_FOLDERS)}}}; "
                             "the package changed its layout")
        pictures, skipped = find_pictures(media)
        if not pictures:
            raise AssetError(f"no captioned pictures found under {MEDIA_DIR} in {deb.name}")
        for picture in pictures:
            target = staging / IMAGES_DIR / picture.relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(picture.source, target)
    splits = split_by_caption(pictures, seed=SEED)
    summary = write_caption_splits(staging, pictures, splits,
                                   image=lambda p: (Path(IMAGES_DIR) / p.relative).as_posix())
    write_json(staging / "info.json", {
        "package": PACKAGE, "package_version": version, "source": f"/{MEDIA_DIR}",
        "seed": SEED, **summary, "skipped": skipped,
    })


ASSETS: list[Asset] = [
    Asset(name="scratch-media", kind="data", build=build, licence="CC-BY-SA-3.0",
          description="Scratch 1.4 media: ~300 backgrounds and costumes (photos, drawings), captions from file names"),
]
