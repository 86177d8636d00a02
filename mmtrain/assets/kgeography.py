"""KGeography flags as a real visual-QA data asset: flag -> country or region, flag -> capital.

The Debian package `kgeography-data` ships maps as `.kgm` XML files under `/usr/share/kgeography`,
each a list of `<division>`s with a `<name>`, often a `<capital>` and a `<flag>` (a PNG under
`flags/`). One entry is made per distinct flag file; how a flag used by several divisions is
resolved:

* maps are read in a fixed order: the world map, then the continent maps (Europe, Asia, Africa,
  North and Central America, South America, Oceania, Caribbean), then all others by file name;
  the first division (in that order, then in file order) with the flag gives its name and capital,
  so `france.png` is "France", not "Réunion (France)", whose map also uses it;
* the division of a map of a country's subdivisions is named with its country, the way KGeography
  itself names "Hawaii (USA)": "Georgia (USA)" and the country "Georgia" stay distinct;
* category = the first continent map the flag is in; for a flag of a subdivision, the country
  the map is of ("Japan"); "World" for a flag found only on the world map;
* two flag files with identical bytes but different names (KGeography gives two Ukrainian oblasts
  the same picture) cannot both be right, so neither is used;
* two flag files that get the same name (Madeira has one on the Africa map and another, the same
  flag drawn at another size, on the Portugal maps) are one entry: the file met first is kept.

Flags stay where the package put them and are referenced by absolute path; `info.json` records the
package version. Writes `flags_{split}.jsonl`, `capitals_{split}.jsonl` (entries with a capital)
and `info.json`; splits are by flag, stratified by category.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmtrain.assets.common import Asset, AssetError, apt_install, debian_package_version, write_jsonl
from mmtrain.assets.splits import DEFAULT_FRACTIONS, SPLITS, count_by, split_items, write_json

PACKAGE = "kgeography-data"
DATA_DIR = Path("/usr/share/kgeography")
SEED = 0
WORLD_MAP = "world"
CONTINENT_MAPS = ("europe", "asia", "africa", "ncamerica", "southamerica", "oceania", "caribbean")
FLAG_QUESTION = "Which country or region does this flag belong to?"
CAPITAL_QUESTION = "What is the capital of the country or region whose flag this is?"


@dataclass(frozen=True)
class FlagEntry:
    """One distinct flag with the name and capital it stands for."""

    flag: str
    """Path of the flag file under `flags/`, also the entry's id."""
    image: Path
    name: str
    capital: str | None
    category: str
    map: str
    """The `.kgm` file (without suffix) the name and capital come from."""


@dataclass(frozen=True)
class _Division:
    rank: int
    """Position in the reading order of all maps; the lowest rank names a flag."""
    map: str
    map_title: str
    subdivision_of: str | None
    name: str
    capital: str | None
    flag: str


def _text(element: ElementTree.Element, tag: str) -> str | None:
    value = element.findtext(tag)
    value = " ".join(value.split()) if value else ""
    return value or None


def _country_of(map_title: str, divisions_name: str | None) -> str:
    """'Russia (Subjects)' -> 'Russia'; 'Portugal Districts' (of 'Districts') -> 'Portugal'."""
    country = re.sub(r"\s*\(.*\)\s*$", "", map_title).strip()
    if divisions_name and country.lower().endswith(" " + divisions_name.lower()):
        country = country[: -len(divisions_name) - 1].strip()
    return country or map_title


def map_order(data_dir: Path = DATA_DIR) -> list[Path]:
    """The `.kgm` maps in the order their names win: world, continents, then the rest by name."""
    maps = {path.stem: path for path in data_dir.glob("*.kgm")}
    first = [WORLD_MAP, *CONTINENT_MAPS]
    missing = [stem for stem in first if stem not in maps]
    if missing:
        raise AssetError(f"{data_dir} has no {', '.join(m + '.kgm' for m in missing)}; "
                         f"{PACKAGE} changed its layout")
    return [maps[stem] for stem in first] + [maps[stem] for stem in sorted(maps) if stem not in first]


def read_divisions(kgm: Path, first_rank: int = 0) -> list[_Division]:
    """The flagged, not-ignored divisions of one map, in file order, ranked from `first_rank` on.

    Raises:
        AssetError: The file is not well-formed XML (named with its line).
    """
    try:
        root = ElementTree.parse(kgm).getroot()
    except ElementTree.ParseError as error:
        raise AssetError(f"{kgm}: not a readable KGeography map ({error})") from None
    stem = kgm.stem
    title = _text(root, "name") or stem
    is_subdivision_map = stem != WORLD_MAP and stem not in CONTINENT_MAPS
    country = _country_of(title, _text(root, "divisionsName")) if is_subdivision_map else None
    divisions = []
    for division in root.iter("division"):
        flag, name = _text(division, "flag"), _text(division, "name")
        if _text(division, "ignore") == "yes" or not flag or not name:
            continue
        divisions.append(_Division(rank=first_rank + len(divisions), map=stem, map_title=title,
                                   subdivision_of=country, name=name, capital=_text(division, "capital"), flag=flag))
    return divisions


def find_flags(data_dir: Path = DATA_DIR) -> tuple[list[FlagEntry], dict[str, int]]:
    """One entry per distinct, readable flag file referenced by a map, in flag-path order.

    Returns:
        The entries, and counts: `divisions` (flagged divisions read), `missing_file`,
        `unreadable`, `identical_pictures` (flags dropped because another flag file has the same
        bytes) and `same_name` (flag files dropped because an earlier one has the same name).
    """
    stats = dict.fromkeys(("divisions", "missing_file", "unreadable", "identical_pictures", "same_name"), 0)
    by_flag: dict[str, list[_Division]] = {}
    for kgm in map_order(data_dir):
        for division in read_divisions(kgm, first_rank=stats["divisions"]):
            stats["divisions"] += 1
            by_flag.setdefault(division.flag, []).append(division)

    entries: list[FlagEntry] = []
    flags_by_digest: dict[str, list[str]] = {}
    for flag in sorted(by_flag):
        image = data_dir / "flags" / flag
        if not image.is_file():
            stats["missing_file"] += 1
            continue
        try:
            with Image.open(image) as picture:
                picture.load()
        except (OSError, ValueError, Image.DecompressionBombError):
            stats["unreadable"] += 1
            continue
        flags_by_digest.setdefault(hashlib.sha256(image.read_bytes()).hexdigest(), []).append(flag)
        entries.append(_entry(flag, image, by_flag[flag]))
    name_of = {e.flag: e.name for e in entries}
    ambiguous = {flag for flags in flags_by_digest.values() if len({name_of[f] for f in flags}) > 1
                 for flag in flags}
    stats["identical_pictures"] = len(ambiguous)
    by_name: dict[str, FlagEntry] = {}
    for entry in sorted((e for e in entries if e.flag not in ambiguous), key=lambda e: by_flag[e.flag][0].rank):
        if entry.name in by_name:
            stats["same_name"] += 1
        else:
            by_name[entry.name] = entry
    return sorted(by_name.values(), key=lambda e: e.flag), stats


def _entry(flag: str, image: Path, divisions: list[_Division]) -> FlagEntry:
    first = divisions[0]
    name = first.name
    if first.subdivision_of and "(" not in name:
        name = f"{name} ({first.subdivision_of})"
    continent = next((d.map_title for d in divisions if d.map in CONTINENT_MAPS), None)
    subdivision_country = next((d.subdivision_of for d in divisions if d.subdivision_of), None)
    category = continent or subdivision_country or first.map_title
    return FlagEntry(flag=flag, image=image, name=name, capital=first.capital, category=category, map=first.map)


def _question(entry: FlagEntry, question: str, answer: str) -> dict:
    return {"id": entry.flag, "image": str(entry.image), "category": entry.category,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def build(staging: Path) -> None:
    """Writes the flag and capital manifests and the info file into `staging`."""
    apt_install([PACKAGE])
    if not (DATA_DIR / "flags").is_dir():
        raise AssetError(f"{PACKAGE} is installed but {DATA_DIR / 'flags'} does not exist; "
                         "the package changed its layout")
    entries, stats = find_flags(DATA_DIR)
    if not entries:
        raise AssetError(f"no flags found in the maps under {DATA_DIR}")
    splits = split_items(entries, key=lambda e: e.flag, seed=SEED, stratify=lambda e: e.category)
    for name in SPLITS:
        write_jsonl(staging / f"flags_{name}.jsonl", (_question(e, FLAG_QUESTION, e.name) for e in splits[name]))
        write_jsonl(staging / f"capitals_{name}.jsonl",
                    (_question(e, CAPITAL_QUESTION, e.capital) for e in splits[name] if e.capital))
    write_json(staging / "info.json", {
        "package": PACKAGE, "package_version": debian_package_version(PACKAGE), "source": str(DATA_DIR),
        "seed": SEED, "fractions": list(DEFAULT_FRACTIONS),
        "counts": {name: {"flags": len(splits[name]), "capitals": sum(1 for e in splits[name] if e.capital)}
                   for name in SPLITS},
        "categories": {name: count_by(e.category for e in splits[name]) for name in SPLITS},
        "stats": stats,
    })


ASSETS: list[Asset] = [
    Asset(name="kgeography", kind="data", build=build, licence="GPL-2.0-or-later",
          description="KGeography: ~660 real flags with country/region name and capital (flag QA)"),
]
