"""Tux Paint stamps as a captioned-picture data asset: real photos and drawings with English captions.

The Debian package `tuxpaint-stamps-default` installs each stamp under
`/usr/share/tuxpaint/stamps/<category>/...` as an image plus a sibling `.txt` whose first line is
the English caption ("A yak.") and whose other lines are translations. What is kept and why:

* raster stamps (PNG) with a caption; category = the first folder under `stamps/` (16 of them);
* SVG stamps are skipped (Pillow cannot read them) and counted, as are those that also have a PNG;
* `NAME_mirror.png` files have no caption: they are hand-drawn mirror images of `NAME.png` that
  Tux Paint shows when a stamp is flipped, so they are skipped rather than given NAME's caption;
* a picture whose bytes equal an earlier one's (in path order) is kept once;
* stamps that share a caption (an outlined and a filled letter "A", six stamps of "A flower.") are
  put in the same split, so no test caption is ever a training caption.

Images stay where the package put them and are referenced by absolute path; `info.json` records
the package version the manifests were made from. Writes `{train,val,test}.jsonl` (caption records
with `id` = the stamp's path under `stamps/` without its suffix) and `info.json`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmtrain.assets.common import Asset, AssetError, apt_install, debian_package_version
from mmtrain.assets.splits import split_by_caption, write_caption_splits, write_json

PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
SEED = 0
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif")
MIRROR_SUFFIX = "_mirror"


@dataclass(frozen=True)
class Stamp:
    """One captioned stamp picture."""

    id: str
    image: Path
    caption: str
    category: str


def read_caption(text_file: Path) -> str:
    """The English caption of a stamp: the first line of its `.txt`, stripped ('' when empty)."""
    lines = text_file.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    return lines[0].strip() if lines else ""


def find_stamps(root: Path = STAMPS_DIR) -> tuple[list[Stamp], dict[str, int]]:
    """Every readable, captioned raster stamp under `root`, in path order, and what was skipped.

    Returns:
        The stamps, and counts of the skipped files by reason: `svg` (all SVG stamps),
        `svg_also_png` (of those, the ones that also exist as PNG), `mirror` (mirror images without
        a caption), `no_caption`, `unreadable` and `duplicate_image`.
    """
    skipped = dict.fromkeys(("svg", "svg_also_png", "mirror", "no_caption", "unreadable", "duplicate_image"), 0)
    stamps: list[Stamp] = []
    seen_digests: set[str] = set()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix == ".svg":
            skipped["svg"] += 1
            skipped["svg_also_png"] += int(path.with_suffix(".png").is_file())
            continue
        if suffix not in RASTER_SUFFIXES:
            continue  # captions, sounds, stamp settings
        text_file = path.with_suffix(".txt")
        caption = read_caption(text_file) if text_file.is_file() else ""
        if not caption:
            is_mirror = path.stem.endswith(MIRROR_SUFFIX)
            skipped["mirror" if is_mirror else "no_caption"] += 1
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
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
        relative = path.relative_to(root)
        stamps.append(Stamp(id=relative.with_suffix("").as_posix(), image=path, caption=caption,
                            category=relative.parts[0] if len(relative.parts) > 1 else "other"))
    return stamps, skipped


def build(staging: Path) -> None:
    """Writes the tuxpaint manifests and info file into `staging`."""
    apt_install([PACKAGE])
    if not STAMPS_DIR.is_dir():
        raise AssetError(f"{PACKAGE} is installed but {STAMPS_DIR} does not exist; the package changed its layout")
    stamps, skipped = find_stamps(STAMPS_DIR)
    if not stamps:
        raise AssetError(f"no captioned raster stamps found under {STAMPS_DIR}")
    splits = split_by_caption(stamps, seed=SEED)
    summary = write_caption_splits(staging, stamps, splits, image=lambda s: str(s.image))
    write_json(staging / "info.json", {
        "package": PACKAGE, "package_version": debian_package_version(PACKAGE), "source": str(STAMPS_DIR),
        "seed": SEED, **summary, "skipped": skipped,
    })


ASSETS: list[Asset] = [
    Asset(name="tuxpaint", kind="data", build=build, licence="GPL-2.0",
          description="Tux Paint stamps: ~780 real photos and drawings with English captions, 16 categories"),
]
