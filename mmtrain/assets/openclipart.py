"""OpenClipart 0.18 as a captioned-picture data asset: public-domain drawings with English captions.

The Debian package `openclipart-png` installs the drawings rendered to PNG under
`/usr/share/openclipart/png/<category>/...`, and `openclipart-svg` the same drawings as SVG under
`/usr/share/openclipart/svg/`, same paths, `.svg` for `.png`. The PNGs' text chunks only repeat the
SVG's title, author and description (non-ASCII garbled); the SVG's RDF metadata (`cc:Work`) also
has the keywords (`dc:subject`), so each PNG is paired with its SVG and the SVG is read. A drawing
filed under several categories is one file plus symbolic links to it, in both packages.

Captions are "A drawing of <phrase>." (at most `MAX_CAPTION_WORDS` words) with the phrase made
from the title. How a title becomes a phrase, in order:

* a "Clipart by NAME - X" prefix is dropped (X is kept); a title naming the drawing's creator has
  the name removed (several authors titled drawings with their own name);
* the X of "Clipart by NAME - X" titles that several drawings share is the name of an upload (ten
  different fruits are all "Clipart by Nicu Buculei - pear"), so those drawings use their file
  name instead, kept only when it is one English noun, with at most a colour ("apple",
  "jigsaw_blue_03" -> "blue jigsaw", "contour_bat" -> "an outline of a bat");
* any other title that `SERIES_MIN` or more drawings share names a series ("gramastar", "card",
  "Part of the Flat Icon Collection (...)", "Lemon SVG theme") and is not used;
* for a flag (a drawing under a `flags/` folder) whose title does not say "flag", the phrase is
  "the flag of X", X being the last " - " part of the title, or the file name when there is no
  title ("Canada - Alberta" -> Alberta; "Historic - X" -> "a historic flag of X"); a leading
  "USA " is dropped ("USA Nevada"); every word of X must be in the word list (below);
* a title with "?" or "!" is an exclamation ("What's Up, Doc?"), not a name of what is drawn;
* a title with a collection word ("collection", "theme", "example", ...) names a collection;
* text in parentheses and after a comma is dropped ("Lime (Whole)", "Stop sign, right font"); of
  " - " parts, descriptor parts ("body part", "clothing", "RPG map elements") are dropped, and of
  the others the one English part is kept ("Farfalla - Butterfly" -> "butterfly"); two English
  parts ("Lock - Open") are ambiguous;
* words are cut at `_`, `.`, `/`, hyphens and lower-to-upper case changes; a number ending a word
  is cut off ("boat1"), other numbers ("tomato 01", "v.2"), file words ("svg", "png", "clipart")
  and stray letters are dropped;
* every remaining word must be in the English word list of the `wamerican` package, and is
  written the way the list writes it ("Football Helmet" -> "football helmet", "jupiter" ->
  "Jupiter", "LED"); words of one or two letters must be in `SHORT_WORDS` ("cm" and "bw" are not
  words here). So Italian titles ("Macchina caffe", "La prugna") and misspellings ("Sallite") fail;
* a phrase of names only ("Dino", "Jacob Leisler", "Valencia") is not used outside flags: it says
  who or where, not what is drawn;
* the phrase's head (its last word before "of", "with", "on", ... or before a final "-ing" word)
  must be a noun: the word list has its plural, or it is a plural, a name, an abbreviation, or in
  `UNCOUNTABLE`/`SAME_PLURAL`; so "LED rounded", "cloudy" and "network could" fail;
* "a"/"an" is put in front unless the phrase starts with a determiner or its head is plural
  ("clouds", "chess pieces", "bouquet of flowers" keeps "a") or uncountable.

When the title gives no phrase and says nothing in English (it is empty, a series name, or has no
common English word of four letters or more), the drawing's folder may: a folder in
`KIND_FOLDERS` (e.g. `animals/birds`) gives its kind ("a bird") when one of the drawing's keywords
agrees ("bird", "birds"). So "Acquila" in `animals/birds` with keyword "bird" is "A drawing of a
bird.", and the 1,375 "gramastar" star polygons are "A drawing of a star.". Otherwise the drawing is
skipped, counted by why its title failed. The SVG descriptions are not used: few drawings have
one, and most are long, or say who made it.

Also skipped and counted in `info.json`: links to a drawing filed elsewhere (`linked_copy`),
unreadable PNGs, images with a side over `MAX_SIDE` (up to 16000x10562) or under `MIN_SIDE` pixels,
pictures whose bytes equal an earlier one's (path order), pictures with almost nothing visible
once composited onto white the way the data loader does (`blank_on_white`: white drawings on a
transparent background), and drawings beyond `MAX_PER_CAPTION` of one caption (`caption_cap`: the
kept ones are spread evenly over the path order, so 8 of the 1,375 stars stand for them all).

Category = the first folder under `png/`. Drawings sharing a caption stay in one split, stratified
by category. Images stay where the package put them and are referenced by absolute path. Writes
`{train,val,test}.jsonl` (caption records, `id` = the path under `png/` without suffix) and
`info.json` (package versions, limits, counts, categories, skipped by reason).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from xml.etree import ElementTree

from PIL import Image

from mmtrain.assets.common import Asset, AssetError, apt_install, debian_package_version
from mmtrain.assets.splits import split_by_caption, write_caption_splits, write_json
from mmtrain.data.images import ImageLoadError, load_image

T = TypeVar("T")

PNG_PACKAGE = "openclipart-png"
SVG_PACKAGE = "openclipart-svg"
WORDS_PACKAGE = "wamerican"
PNG_DIR = Path("/usr/share/openclipart/png")
SVG_DIR = Path("/usr/share/openclipart/svg")
WORDS_FILE = Path("/usr/share/dict/words")
SEED = 0
MAX_SIDE = 4096
MIN_SIDE = 16
BLANK_FRACTION = 0.005
"""A picture with fewer non-white pixels than this share, once composited onto white, is blank."""
SERIES_MIN = 20
MAX_CAPTION_WORDS = 12
MAX_PER_CAPTION = 8

NAMESPACES = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
}
WORK_TAGS = ("{http://web.resource.org/cc/}Work", "{http://creativecommons.org/ns#}Work")
AGENT_TAGS = ("{http://web.resource.org/cc/}Agent", "{http://creativecommons.org/ns#}Agent")

CLIPART_BY = re.compile(r"^\s*clipart by (?P<name>.+?)(?:\s+-+\s+(?P<rest>.*))?\s*$", re.IGNORECASE)
PART_SEPARATOR = re.compile(r"\s+-+\s*|\s*-+\s+")
DESCRIPTOR_PARTS = frozenset({"body part", "clothing", "symbol", "iconset", "rpg map elements"})
FILE_WORDS = frozenset({"svg", "png", "clipart", "cliparts", "jpg"})
COLLECTION_WORDS = frozenset({"collection", "example", "examples", "iconset", "submission", "theme"})
"""Words that make a title the name of a collection ("Hotel Icon Collection ..."), not of one drawing."""
SHORT_WORDS = frozenset({"a", "an", "at", "by", "in", "of", "on", "to", "up", "ox", "tv", "pc", "cd", "uk", "us"})
DETERMINERS = frozenset({"a", "an", "the", "another", "this", "that", "these", "those", "no", "one", "two",
                         "three", "four", "five", "six", "seven", "eight", "nine", "ten", "some", "many", "several",
                         "my", "your", "our", "his", "her", "their"})
UNCOUNTABLE = frozenset({"air", "art", "bacon", "bread", "chess", "corn", "equipment", "fire", "fitness", "food",
                         "furniture", "grass", "hair", "judo", "knitting", "lemonade", "lightning", "luggage", "milk",
                         "money", "music", "paprika", "rain", "rice", "rugby", "smoke", "snow", "spaghetti",
                         "storage", "sunshine", "sushi", "tennis", "text", "water", "wood", "yoga"})
SAME_PLURAL = frozenset({"aircraft", "deer", "fish", "pantyhose", "sheep", "crossbones"})
"""Nouns whose plural is the word itself (the word list has no other plural of them)."""
HEAD_BREAKERS = frozenset({"of", "with", "in", "on", "at", "for", "by", "from", "under", "over", "and", "or", "into",
                           "to", "against", "without", "drawn", "holding", "wearing", "opening"})
"""Words after which a phrase's head noun ("bouquet" of "bouquet of flowers") is already said."""
PLURAL_ONLY = frozenset({"people", "men", "women", "children", "mice", "geese", "teeth", "feet", "dice", "pantyhose",
                         "crossbones"})
YOU_OR_WA_SOUNDS = ("eu", "one", "once", "uni", "use", "usu", "uti", "ukr", "ura", "ure", "uro")
"""Beginnings of words that start with a vowel letter but not a vowel sound ("a unicorn", "a one-way sign")."""
COLOURS = frozenset({"black", "blue", "brown", "gray", "green", "grey", "orange", "pink", "purple", "red",
                     "white", "yellow"})
FLAG_NAME_LOWER = frozenset({"and", "of", "the", "de", "du", "la", "le", "y", "et"})

KIND_FOLDERS: dict[str, tuple[str, frozenset[str]]] = {
    "animals/birds": ("a bird", frozenset({"bird", "birds"})),
    "animals/bugs": ("a bug", frozenset({"bug", "bugs", "insect", "insects"})),
    "animals/dinosaurs": ("a dinosaur", frozenset({"dinosaur", "dinosaurs"})),
    "animals/fish": ("an aquatic animal", frozenset({"fish", "fishes"})),
    "animals/mammals": ("an animal", frozenset({"animal", "animals", "mammal", "mammals"})),
    "buildings/homes": ("a house", frozenset({"house", "houses", "home", "homes"})),
    "food/fruit": ("a fruit", frozenset({"fruit", "fruits"})),
    "food/vegetables": ("a vegetable", frozenset({"vegetable", "vegetables"})),
    "people/smilies": ("a smiley face", frozenset({"smiley", "smilies", "smileys"})),
    "people/stickmen": ("a stick figure", frozenset({"stickman", "stickmen"})),
    "plants/flowers": ("a flower", frozenset({"flower", "flowers"})),
    "recreation/games/cards": ("a playing card", frozenset({"card", "cards"})),
    "shapes/arrows": ("an arrow", frozenset({"arrow", "arrows"})),
    "shapes/stars": ("a star", frozenset({"star", "stars"})),
    "signs_and_symbols/clocks": ("a clock", frozenset({"clock", "clocks"})),
    "transportation/roadsigns": ("a road sign", frozenset({"roadsign", "roadsigns"})),
}
"""Folders whose every drawing is one kind of thing -> (phrase, keywords that must agree)."""
ICON_FOLDER = "computer/icons"
"""Icon file names name the command an icon stands for ("fileprint"), not what it shows."""


@dataclass(frozen=True)
class Metadata:
    """What an OpenClipart SVG says about its drawing (`cc:Work` in its RDF)."""

    title: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    creator: str = ""


@dataclass(frozen=True)
class Drawing:
    """One captioned drawing."""

    id: str
    image: Path
    caption: str
    category: str


class Words:
    """The English word list: which words are English and how it spells them."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = frozenset(w.strip() for w in words if w.strip())

    @classmethod
    def load(cls, path: Path = WORDS_FILE) -> Words:
        """The word list in `path`, one word a line.

        Raises:
            AssetError: The file is missing.
        """
        if not path.is_file():
            raise AssetError(f"the English word list {path} does not exist; install the Debian package "
                             f"{WORDS_PACKAGE} (`apt-get install {WORDS_PACKAGE}`)")
        return cls(path.read_text(encoding="utf-8", errors="replace").splitlines())

    def spelling(self, word: str) -> str | None:
        """`word` as the list writes it: lower-case for a common word, capitalised for a name, or None.

        A word written in capitals that the list has in capitals stays so ("LED", "PC").
        """
        lower = word.lower()
        if len(lower) <= 2 and lower not in SHORT_WORDS:
            return None
        forms = (word, lower) if word.isupper() and len(word) > 1 else (lower, word)
        for form in (*forms, lower.capitalize(), word.upper()):
            if form in self.words:
                return form
        return None

    def is_common(self, word: str) -> bool:
        """Whether `word` is a common English word (not only a name) of four letters or more."""
        return len(word) >= 4 and word.lower() in self.words

    def is_name(self, word: str) -> bool:
        """Whether the list has `word` only as a name (capitalised), not as a common word."""
        return word[:1].isupper() and word.lower() not in self.words and not word.isupper()

    def is_noun(self, word: str) -> bool:
        """Whether `word` can be what a phrase is about.

        True for a noun (the list has its plural), a plural, an uncountable noun, a name or an
        abbreviation; False for "rounded", "cloudy" or "could".
        """
        lower = word.lower()
        if lower in UNCOUNTABLE or lower in SAME_PLURAL or self.is_plural(word) or word[:1].isupper():
            return True
        plurals = (lower + "s", lower + "es", lower[:-1] + "ies", lower[:-3] + "men" if lower.endswith("man") else "")
        return any(form in self.words for form in plurals if form)

    def is_plural(self, word: str) -> bool:
        """Whether `word` reads as a plural noun ("clouds", "glasses", "cherries", "people")."""
        lower = word.lower()
        if lower in PLURAL_ONLY:
            return True
        if not lower.endswith("s") or lower.endswith(("ss", "us", "is", "'s")):
            return False
        return (lower[:-1] in self.words or (lower.endswith("es") and lower[:-2] in self.words)
                or (lower.endswith("ies") and lower[:-3] + "y" in self.words))


def parse_metadata(svg: str | bytes) -> Metadata:
    """Title, description, keywords and creator from an SVG's RDF metadata (empty when it has none).

    Raises:
        ElementTree.ParseError: The SVG is not well-formed XML.
    """
    root = ElementTree.fromstring(svg)
    work = next((element for element in root.iter() if element.tag in WORK_TAGS), None)
    if work is None:
        return Metadata()

    def text(element: ElementTree.Element | None) -> str:
        return " ".join((element.text or "").split()) if element is not None else ""

    keywords = tuple(k for k in (text(li) for li in work.findall("dc:subject/rdf:Bag/rdf:li", NAMESPACES)) if k)
    creator = work.find("dc:creator", NAMESPACES)
    agent = next((e for e in creator.iter() if e.tag in AGENT_TAGS), None) if creator is not None else None
    return Metadata(title=text(work.find("dc:title", NAMESPACES)),
                    description=text(work.find("dc:description", NAMESPACES)), keywords=keywords,
                    creator=text(agent.find("dc:title", NAMESPACES)) if agent is not None else "")


def split_words(text: str) -> list[str]:
    """The words of a title or file name, without numbers, file words and stray letters.

    A number ending a word is cut off ("boat1" -> "boat"); other words with digits are dropped.
    """
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
    words = re.split(r"[\s_./,:;!?+\"()\[\]{}*#&=|\\-]+", text)
    words = [re.sub(r"(?<=[A-Za-z])\d+$", "", w.strip("'")) for w in words]
    return [w for w in words if w and not any(c.isdigit() for c in w) and w.lower() not in FILE_WORDS
            and (len(w) > 1 or w.lower() == "a")]


def english(words: list[str], vocabulary: Words) -> list[str] | None:
    """`words` as the word list spells them, or None when one of them is not in it."""
    spelled = [vocabulary.spelling(w) for w in words]
    if not spelled or None in spelled:
        return None
    return [s for s in spelled if s is not None]


def head_word(words: list[str]) -> str:
    """The noun a phrase is about.

    Its last word before "of", "with", "on", ... ("bouquet of flowers"), or before a final "-ing"
    word ("man singing"), or its last word.
    """
    for index, word in enumerate(words[1:], start=1):
        if word.lower() in HEAD_BREAKERS:
            return words[index - 1]
    if len(words) > 1 and words[-1].endswith("ing"):
        return words[-2]
    return words[-1]


def with_article(words: list[str], vocabulary: Words) -> str:
    """The phrase with "a"/"an" in front when it needs one (not before a plural or uncountable head)."""
    phrase = " ".join(words)
    first, head = words[0], head_word(words)
    if first.lower() in DETERMINERS or vocabulary.is_plural(head) or head.lower() in UNCOUNTABLE:
        return phrase
    return f"{'an' if starts_with_vowel_sound(first) else 'a'} {phrase}"


def starts_with_vowel_sound(word: str) -> bool:
    """Whether "an" goes before `word`: "an apple", "an LED", "an umbrella"; "a unicorn", "a Ukrainian", "a euro"."""
    if word.isupper() and len(word) > 1:
        return word[0] in "AEFHILMNORSX"  # spelled out letter by letter
    lower = word.lower()
    return lower[:1] in "aeiou" and not lower.startswith(YOU_OR_WA_SOUNDS)


def strip_creator(title: str, creator: str) -> str:
    """The title without a "Clipart by NAME - " prefix and without the creator's name."""
    match = CLIPART_BY.match(title)
    if match:
        title = match.group("rest") or ""
    if len(creator) > 3:
        title = re.sub(re.escape(creator), " ", title, flags=re.IGNORECASE)
    return " ".join(title.replace("--", " - ").split())


def flag_phrase(title: str, vocabulary: Words) -> tuple[str | None, str]:
    """The phrase of a flag whose title does not say "flag": "the flag of Alberta", or None and why.

    `title` is the drawing's title, or its file name when it has no title ("guinea_bissau").
    """
    parts = [p for p in PART_SEPARATOR.split(title) if p.strip()]
    if not parts:
        return None, "no_title"
    historic = len(parts) > 1 and parts[0].strip().lower() == "historic"
    name = re.sub(r"^USA\s+", "", parts[-1].strip())
    words = [w if w.lower() in FLAG_NAME_LOWER or not w.islower() else w.capitalize() for w in split_words(name)]
    if not words:
        return None, "no_title"
    if english(words, vocabulary) is None:
        return None, "not_english"
    return f"{'a historic flag' if historic else 'the flag'} of {' '.join(words)}", ""


def word_phrase(text: str, vocabulary: Words) -> tuple[str | None, str]:
    """The phrase of an ordinary title (see the module docstring), or None and why."""
    if "?" in text or "!" in text:
        return None, "exclamation"
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", text).split(",")[0]
    parts = [p.strip() for p in PART_SEPARATOR.split(text) if p.strip()]
    parts = [p for p in parts if p.lower() not in DESCRIPTOR_PARTS]
    candidates = [split_words(p) for p in parts]
    candidates = [c for c in candidates if c]
    if not candidates:
        return None, "no_title"
    if any(w.lower() in COLLECTION_WORDS for c in candidates for w in c):
        return None, "collection_title"
    spelled = [s for s in (english(c, vocabulary) for c in candidates) if s is not None]
    if not spelled:
        return None, "not_english"
    if len(spelled) > 1:
        return None, "ambiguous_title"
    words = spelled[0]
    if all(vocabulary.is_name(w) for w in words):
        return None, "name_only"
    if not vocabulary.is_noun(head_word(words)):
        return None, "not_a_noun"
    return with_article(words, vocabulary), ""


def file_name_phrase(stem: str, vocabulary: Words) -> str | None:
    """The phrase of a file name that is one English word, with at most a colour: "a blue jigsaw".

    "contour_bat" is "an outline of a bat".
    """
    words = english(split_words(stem), vocabulary)
    if words is None or not 1 <= len(words) <= 2 or any(vocabulary.is_name(w) for w in words):
        return None
    outline = len(words) == 2 and words[0] == "contour"
    if outline:
        words = words[1:]
    colours = [w for w in words if w in COLOURS] if len(words) == 2 else []
    things = [w for w in words if w not in colours]
    if len(things) != 1 or not vocabulary.is_noun(things[0]):
        return None
    phrase = with_article(colours + things, vocabulary)
    return f"an outline of {phrase}" if outline else phrase


def kind_phrase(folder: str, keywords: Iterable[str]) -> str | None:
    """The kind of thing a `KIND_FOLDERS` folder holds, when one of the drawing's keywords agrees."""
    for prefix, (phrase, agreeing) in KIND_FOLDERS.items():
        if folder == prefix or folder.startswith(prefix + "/"):
            normalised = {w.lower() for keyword in keywords for w in (keyword, *keyword.split())}
            return phrase if normalised & agreeing else None
    return None


def caption_for(relative: Path, metadata: Metadata, title_uses: Counter[str],
                vocabulary: Words) -> tuple[str | None, str]:
    """The caption of the drawing at `relative` (under `png/`), or None and the reason it has none.

    Args:
        relative: The PNG's path under `png/`.
        metadata: Its SVG's metadata.
        title_uses: How many drawings have each title (raw, as in the SVG).
        vocabulary: The English word list.
    """
    folder = relative.parent.as_posix()
    title = strip_creator(metadata.title, metadata.creator)
    says_nothing = True
    shared_upload_name = bool(CLIPART_BY.match(metadata.title)) and title_uses[metadata.title] > 1
    if shared_upload_name and not folder.startswith(ICON_FOLDER):
        phrase, reason = file_name_phrase(relative.stem, vocabulary), "upload_title"
    elif metadata.title and title_uses[metadata.title] >= SERIES_MIN:
        phrase, reason = None, "series_title"
    elif "flags" in relative.parent.parts and "flag" not in title.lower():
        phrase, reason = flag_phrase(title or relative.stem, vocabulary)
    else:
        phrase, reason = word_phrase(title, vocabulary)
        says_nothing = not any(vocabulary.is_common(w) for w in split_words(title))
    if phrase is None and says_nothing:
        phrase = kind_phrase(folder, metadata.keywords)
    if phrase is None:
        return None, reason
    caption = f"A drawing of {phrase}."
    if len(caption.split()) > MAX_CAPTION_WORDS:
        return None, "too_long"
    return caption, ""


def is_blank_on_white(path: Path) -> bool:
    """Whether almost nothing is visible once the picture is composited onto white (as the loader does)."""
    gray = load_image(path).convert("L")
    histogram = gray.histogram()
    visible = sum(histogram[:240])
    return visible < BLANK_FRACTION * gray.width * gray.height


def evenly_spread(items: list[T], count: int) -> list[T]:
    """`count` items spread evenly over `items` (all of them when there are no more than `count`)."""
    if len(items) <= count:
        return items
    return [items[(i * len(items)) // count] for i in range(count)]


def find_drawings(png_dir: Path = PNG_DIR, svg_dir: Path = SVG_DIR,
                  vocabulary: Words | None = None) -> tuple[list[Drawing], dict[str, int]]:
    """Every captioned, readable, distinct drawing under `png_dir`, in path order, and what was skipped.

    Returns:
        The drawings, and counts of the skipped PNGs by reason (see the module docstring).
    """
    vocabulary = vocabulary or Words.load()
    skipped: Counter[str] = Counter()
    found: list[tuple[Path, Path, Metadata]] = []
    for path in sorted(png_dir.rglob("*.png")):
        if path.is_symlink():
            skipped["linked_copy"] += 1
            continue
        relative = path.relative_to(png_dir)
        svg = svg_dir / relative.with_suffix(".svg")
        if not svg.is_file():
            skipped["no_svg"] += 1
            continue
        try:
            metadata = parse_metadata(svg.read_bytes())
        except ElementTree.ParseError:
            skipped["bad_svg"] += 1
            continue
        found.append((path, relative, metadata))
    title_uses = Counter(metadata.title for _, _, metadata in found)

    by_caption: dict[str, list[Drawing]] = {}
    seen_digests: set[str] = set()
    for path, relative, metadata in found:
        caption, reason = caption_for(relative, metadata, title_uses, vocabulary)
        if caption is None:
            skipped[reason] += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    size = image.size
        except Image.DecompressionBombError:
            skipped["too_large"] += 1
            continue
        except (OSError, ValueError):
            skipped["unreadable"] += 1
            continue
        if max(size) > MAX_SIDE:
            skipped["too_large"] += 1
            continue
        if min(size) < MIN_SIDE:
            skipped["too_small"] += 1
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen_digests:
            skipped["duplicate_image"] += 1
            continue
        try:
            blank = is_blank_on_white(path)
        except ImageLoadError:
            skipped["unreadable"] += 1
            continue
        if blank:
            skipped["blank_on_white"] += 1
            continue
        seen_digests.add(digest)
        by_caption.setdefault(caption, []).append(Drawing(
            id=relative.with_suffix("").as_posix(), image=path, caption=caption, category=relative.parts[0]))
    drawings: list[Drawing] = []
    for group in by_caption.values():
        kept = evenly_spread(group, MAX_PER_CAPTION)
        skipped["caption_cap"] += len(group) - len(kept)
        drawings += kept
    return sorted(drawings, key=lambda d: d.id), dict(sorted(skipped.items()))


def build(staging: Path) -> None:
    """Writes the openclipart manifests and info file into `staging`."""
    apt_install([PNG_PACKAGE, SVG_PACKAGE, WORDS_PACKAGE])
    for folder, package in ((PNG_DIR, PNG_PACKAGE), (SVG_DIR, SVG_PACKAGE)):
        if not folder.is_dir():
            raise AssetError(f"{package} is installed but {folder} does not exist; the package changed its layout")
    drawings, skipped = find_drawings(PNG_DIR, SVG_DIR, Words.load(WORDS_FILE))
    if not drawings:
        raise AssetError(f"no captioned drawings found under {PNG_DIR}")
    splits = split_by_caption(drawings, seed=SEED)
    summary = write_caption_splits(staging, drawings, splits, image=lambda d: str(d.image))
    write_json(staging / "info.json", {
        "packages": {package: debian_package_version(package) for package in (PNG_PACKAGE, SVG_PACKAGE,
                                                                              WORDS_PACKAGE)},
        "source": str(PNG_DIR), "seed": SEED,
        "limits": {"max_side": MAX_SIDE, "min_side": MIN_SIDE, "series_min": SERIES_MIN,
                   "max_caption_words": MAX_CAPTION_WORDS,
                   "max_per_caption": MAX_PER_CAPTION, "blank_fraction": BLANK_FRACTION},
        **summary, "skipped": skipped,
    })


ASSETS: list[Asset] = [
    Asset(name="openclipart", kind="data", build=build, licence="public domain",
          description="OpenClipart 0.18: ~2,200 public-domain drawings captioned from their titles and folders"),
]
