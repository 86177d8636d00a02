"""A few million words of real English prose from Debian's documentation packages.

A surrogate's translator stands in for a dozen decoder layers; it needs far more text than the
`prose` asset's 630 sentences to learn that. Two documentation packages ship their sources as
reStructuredText: the Linux kernel's (`linux-doc-6.1`) and Python's (`python3.11-doc`), as
`html/_sources/**/*.rst.txt`. The packages are downloaded and unpacked into a scratch folder, not
installed (minimal systems often exclude /usr/share/doc from installs). Their prose paragraphs (directives, code,
tables, headings and lists dropped; inline markup reduced to its text) are cut into texts of at
most 160 words at sentence ends, de-duplicated and split 98/1/1 by a seeded shuffle:

* `{train,val,test}.txt`: one text a line (`mmtrain eval --text`, `--texts`, converter corpora);
* `{train,val,test}.jsonl`: text-only samples: "Continue this text:" with the first quarter of
  the words, the rest as the target (language-model training on everything but the opening);
* `mix.jsonl`: a seeded subset of 1,024 of the training samples, to mix text-only samples into
  image-text training in a proportion like the captions' own (a list of manifests is one pool);
* `sentences.txt`: the training texts' sentences of 4-40 words, one a line: a word converter's
  corpus (two tokenizers split a sentence into equally many pieces far more often than a text).

`info.json` records the package versions, a hash over every source file, and the counts.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from pathlib import Path

from mmtrain.assets.common import Asset, AssetError, deb_field, download_package, scratch_dir, unpack, write_jsonl
from mmtrain.assets.splits import SPLITS, split_items, write_json

SOURCES = {  # package -> folder of its reStructuredText sources, inside the unpacked package
    "linux-doc-6.1": Path("usr/share/doc/linux-doc-6.1/html/_sources"),
    "python3.11-doc": Path("usr/share/doc/python3.11/html/_sources"),
}
SEED = 0
FRACTIONS = (0.98, 0.01, 0.01)
MIN_WORDS, MAX_WORDS = 20, 160
SENTENCE_WORDS = (4, 40)
MIX_SAMPLES = 1024
INSTRUCTION = "Continue this text:"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"])")
_ROLE = re.compile(r":[a-zA-Z:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_INTERPRETED = re.compile(r"`([^`]+)`_{0,2}")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_SUBSTITUTION = re.compile(r"\|([^|\s][^|]*?)\|_?")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+_.:])\1{2,}\s*$")
_LIST_ITEM = re.compile(r"^(?:[-*+•]|\d+[.)]|#\.|\(?[a-zA-Z0-9]\))\s")


def _strip_markup(text: str) -> str:
    for pattern in (_ROLE, _LINK, _LITERAL, _INTERPRETED, _EMPHASIS, _SUBSTITUTION):
        text = pattern.sub(r"\1", text)
    return text.replace("\\", "")


def _is_prose(lines: list[str]) -> bool:
    first = lines[0]
    if first[:1].isspace() or first.startswith(("..", "|", "+", ":", ">>>", "$ ", "#")) or _LIST_ITEM.match(first):
        return False  # indented (code, quotes, directive bodies), directives, tables, fields, sessions, lists
    if any(_UNDERLINE.match(line) for line in lines) or lines[-1].rstrip().endswith("::"):
        return False  # a heading, or the paragraph introducing a literal block
    return True


def paragraphs(rst: str) -> Iterator[str]:
    """The prose paragraphs of a reStructuredText document, markup reduced to text, whitespace collapsed."""
    block: list[str] = []
    for line in rst.splitlines() + [""]:
        if line.strip():
            block.append(line)
            continue
        if block and _is_prose(block):
            text = " ".join(_strip_markup(" ".join(block)).split())
            letters = sum(c.isalpha() for c in text)
            if text[:1].isupper() and letters > 0.7 * len(text):
                yield text
        block = []


def texts_of(paragraph: str) -> list[str]:
    """A paragraph as texts of MIN_WORDS..MAX_WORDS words, cut at sentence ends (longer sentences dropped)."""
    out, current = [], []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        if len(current) + len(words) > MAX_WORDS and current:
            out.append(current)
            current = []
        if len(words) <= MAX_WORDS:
            current += words
    if current:
        out.append(current)
    return [" ".join(words) for words in out if len(words) >= MIN_WORDS]


def sentences_of(text: str) -> list[str]:
    """The text's sentences of SENTENCE_WORDS words."""
    return [s for s in _SENTENCE_END.split(text) if SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1]]


def continuation_sample(text: str, split: str, index: int) -> dict:
    """A text-only sample: the first quarter of the words in, the rest out."""
    words = text.split()
    cut = max(1, len(words) // 4)
    return {"id": f"debian-text-{split}-{index:06d}", "image": None, "conversations": [
        {"from": "human", "value": f"{INSTRUCTION} {' '.join(words[:cut])}"},
        {"from": "gpt", "value": " ".join(words[cut:])},
    ]}


def source_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.rst.txt") if p.is_file())


def build(staging: Path) -> None:
    """Downloads and unpacks the packages, writes the texts, text-only manifests and info file into `staging`."""
    digest = hashlib.sha256()
    collected: dict[str, None] = {}
    files_read, versions = {}, {}
    with scratch_dir("debian-text.") as work:
        for package, relative in SOURCES.items():
            deb = download_package(package, work)
            versions[package] = deb_field(deb, "Version")
            unpack(deb, work / package)
            folder = work / package / relative
            files = source_files(folder)
            if not files:
                raise AssetError(f"no *.rst.txt sources under {relative} in {deb.name}; the package changed its layout")
            files_read[package] = len(files)
            for path in files:
                data = path.read_bytes()
                digest.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(data).digest())
                for paragraph in paragraphs(data.decode("utf-8", errors="replace")):
                    for text in texts_of(paragraph):
                        collected.setdefault(text, None)
    if len(collected) < 20_000:
        raise AssetError(f"only {len(collected)} prose texts in {', '.join(SOURCES)}; expected well over 20,000")
    splits = split_items(list(collected), key=lambda s: s, fractions=FRACTIONS, seed=SEED)
    for name in SPLITS:
        (staging / f"{name}.txt").write_text("".join(s + "\n" for s in splits[name]), encoding="utf-8")
        write_jsonl(staging / f"{name}.jsonl", (continuation_sample(s, name, i) for i, s in enumerate(splits[name])))
    train_samples = [continuation_sample(s, "train", i) for i, s in enumerate(splits["train"])]
    write_jsonl(staging / "mix.jsonl", random.Random(SEED).sample(train_samples, MIX_SAMPLES))
    sentences = [sentence for text in splits["train"] for sentence in sentences_of(text)]
    (staging / "sentences.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    write_json(staging / "info.json", {
        "packages": versions, "sources": {p: str(f) for p, f in SOURCES.items()},
        "source_files": files_read, "sources_sha256": digest.hexdigest(), "seed": SEED, "fractions": FRACTIONS,
        "words_per_text": [MIN_WORDS, MAX_WORDS], "counts": {name: len(splits[name]) for name in SPLITS},
        "words": {name: sum(len(s.split()) for s in splits[name]) for name in SPLITS},
        "sentences": len(sentences),
    })


ASSETS: list[Asset] = [
    Asset(name="debian-text", kind="data", build=build, licence="GPL-2 (Linux documentation), PSF-2.0 (Python docs)",
          description="a few million words of English prose from the Linux kernel's and Python's documentation"),
]
