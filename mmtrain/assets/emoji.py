"""Noto Color Emoji glyphs as a captioned-picture data asset ("fox face", "red apple", ...).

The Debian package `fonts-noto-color-emoji` ships one colour bitmap font (CBDT), which FreeType
renders only at its native size, 109; every glyph is then a 136x128 bitmap. Each single code point
in the font's character map that has a Unicode name is drawn with Pillow onto a white 136x128 RGB
canvas and saved as `images/u<hex>.png`; a glyph that draws nothing (space, joiners, tag
characters) is skipped. Caption = `unicodedata.name(char).lower()`; category = the Unicode block
of the code point. The names come from this Python's Unicode database (its version is in
`info.json`): code points newer than it have no name here and are skipped.

Writes `images/`, `{train,val,test}.jsonl` (caption records, image paths relative to the manifest,
`id` = "U+1F98A") and `info.json`.
"""

from __future__ import annotations

import struct
import unicodedata
from pathlib import Path

import PIL
from PIL import Image, ImageDraw, ImageFont, features

from mmtrain.assets.common import Asset, AssetError, apt_install, debian_package_version, write_jsonl
from mmtrain.assets.splits import DEFAULT_FRACTIONS, SPLITS, count_by, split_items, write_json

PACKAGE = "fonts-noto-color-emoji"
FONT_FILE = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109
"""The only size the font's bitmaps come in (FreeType refuses others for CBDT fonts)."""
CANVAS = (136, 128)
SEED = 0

# (first code point, last code point, block name) for the blocks emoji fonts draw from.
UNICODE_BLOCKS: tuple[tuple[int, int, str], ...] = (
    (0x0000, 0x007F, "Basic Latin"),
    (0x0080, 0x00FF, "Latin-1 Supplement"),
    (0x2000, 0x206F, "General Punctuation"),
    (0x20D0, 0x20FF, "Combining Diacritical Marks for Symbols"),
    (0x2100, 0x214F, "Letterlike Symbols"),
    (0x2190, 0x21FF, "Arrows"),
    (0x2300, 0x23FF, "Miscellaneous Technical"),
    (0x2460, 0x24FF, "Enclosed Alphanumerics"),
    (0x25A0, 0x25FF, "Geometric Shapes"),
    (0x2600, 0x26FF, "Miscellaneous Symbols"),
    (0x2700, 0x27BF, "Dingbats"),
    (0x2900, 0x297F, "Supplemental Arrows-B"),
    (0x2B00, 0x2BFF, "Miscellaneous Symbols and Arrows"),
    (0x3000, 0x303F, "CJK Symbols and Punctuation"),
    (0x3200, 0x32FF, "Enclosed CJK Letters and Months"),
    (0xFE00, 0xFE0F, "Variation Selectors"),
    (0x1F000, 0x1F02F, "Mahjong Tiles"),
    (0x1F0A0, 0x1F0FF, "Playing Cards"),
    (0x1F100, 0x1F1FF, "Enclosed Alphanumeric Supplement"),
    (0x1F200, 0x1F2FF, "Enclosed Ideographic Supplement"),
    (0x1F300, 0x1F5FF, "Miscellaneous Symbols and Pictographs"),
    (0x1F600, 0x1F64F, "Emoticons"),
    (0x1F680, 0x1F6FF, "Transport and Map Symbols"),
    (0x1F780, 0x1F7FF, "Geometric Shapes Extended"),
    (0x1F900, 0x1F9FF, "Supplemental Symbols and Pictographs"),
    (0x1FA70, 0x1FAFF, "Symbols and Pictographs Extended-A"),
    (0xE0000, 0xE007F, "Tags"),
)


def unicode_block(code_point: int) -> str:
    """The Unicode block of `code_point` among UNICODE_BLOCKS, else "Other"."""
    for first, last, name in UNICODE_BLOCKS:
        if first <= code_point <= last:
            return name
    return "Other"


def font_code_points(font_file: Path) -> list[int]:
    """The code points a TrueType font maps to glyphs, read from its `cmap` table (formats 4 and 12).

    Raises:
        AssetError: The file is not a font with a usable Unicode `cmap`.
    """
    data = font_file.read_bytes()
    try:
        (num_tables,) = struct.unpack_from(">H", data, 4)
        tables = {}
        for i in range(num_tables):
            tag, _checksum, offset, _length = struct.unpack_from(">4sIII", data, 12 + 16 * i)
            tables[tag] = offset
        cmap = tables[b"cmap"]
        _version, num_subtables = struct.unpack_from(">HH", data, cmap)
        code_points: set[int] = set()
        for i in range(num_subtables):
            platform, encoding, offset = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
            if platform not in (0, 3):  # 0: Unicode, 3: Windows (Unicode encodings)
                continue
            code_points |= _cmap_subtable(data, cmap + offset)
    except (struct.error, KeyError) as error:
        raise AssetError(f"{font_file}: cannot read the font's character map ({error!r})") from None
    if not code_points:
        raise AssetError(f"{font_file}: the font maps no Unicode code points")
    return sorted(code_points)


def _cmap_subtable(data: bytes, start: int) -> set[int]:
    (fmt,) = struct.unpack_from(">H", data, start)
    if fmt == 12:
        (num_groups,) = struct.unpack_from(">I", data, start + 12)
        found: set[int] = set()
        for g in range(num_groups):
            first, last, _glyph = struct.unpack_from(">III", data, start + 16 + 12 * g)
            found.update(range(first, last + 1))
        return found
    if fmt == 4:
        (seg_x2,) = struct.unpack_from(">H", data, start + 6)
        ends = struct.unpack_from(f">{seg_x2 // 2}H", data, start + 14)
        starts = struct.unpack_from(f">{seg_x2 // 2}H", data, start + 16 + seg_x2)
        return {cp for first, last in zip(starts, ends) if first != 0xFFFF for cp in range(first, last + 1)}
    return set()  # other formats (e.g. 14, variation sequences) map no single code points


def render_glyph(font: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """`char` drawn in colour on a white CANVAS-sized RGB image, or None when nothing is drawn."""
    canvas = Image.new("RGB", CANVAS, "white")
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    if all(low == 255 for low, _high in canvas.getextrema()):
        return None
    return canvas


def build(staging: Path) -> None:
    """Renders the glyphs into `staging/images` and writes the manifests and info file."""
    apt_install([PACKAGE])
    if not FONT_FILE.is_file():
        raise AssetError(f"{PACKAGE} is installed but {FONT_FILE} does not exist; the package changed its layout")
    try:
        font = ImageFont.truetype(str(FONT_FILE), FONT_SIZE)
    except OSError as error:
        raise AssetError(f"Pillow cannot open {FONT_FILE} at size {FONT_SIZE} ({error}); "
                         "Pillow needs FreeType with PNG support for colour bitmap fonts") from None
    images = staging / "images"
    images.mkdir()
    records: list[dict] = []
    skipped = {"unnamed": 0, "blank": 0}
    for code_point in font_code_points(FONT_FILE):
        char = chr(code_point)
        name = unicodedata.name(char, "")
        if not name:
            skipped["unnamed"] += 1
            continue
        picture = render_glyph(font, char)
        if picture is None:
            skipped["blank"] += 1
            continue
        file_name = f"u{code_point:04x}.png"
        picture.save(images / file_name)
        records.append({"id": f"U+{code_point:04X}", "image": f"images/{file_name}", "text": name.lower(),
                        "category": unicode_block(code_point)})
    if not records:
        raise AssetError(f"no glyph of {FONT_FILE} rendered; check Pillow's FreeType build")
    splits = split_items(records, key=lambda r: r["id"], seed=SEED, stratify=lambda r: r["category"])
    for name in SPLITS:
        write_jsonl(staging / f"{name}.jsonl", splits[name])
    write_json(staging / "info.json", {
        "package": PACKAGE, "package_version": debian_package_version(PACKAGE), "font": str(FONT_FILE),
        "font_size": FONT_SIZE, "image_size": list(CANVAS), "unicode_version": unicodedata.unidata_version,
        "pillow_version": PIL.__version__, "freetype_version": features.version("freetype2"),
        "seed": SEED, "fractions": list(DEFAULT_FRACTIONS),
        "counts": {name: len(splits[name]) for name in SPLITS},
        "categories": {name: count_by(r["category"] for r in splits[name]) for name in SPLITS},
        "skipped": skipped,
    })


ASSETS: list[Asset] = [
    Asset(name="emoji", kind="data", build=build, licence="OFL-1.1 (font), Apache-2.0 (images)",
          description="Noto Color Emoji: ~1400 colour glyphs (136x128) captioned with their Unicode names"),
]
