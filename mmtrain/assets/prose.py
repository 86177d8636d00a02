"""Real English prose as text-only data: the licence texts every Debian system ships.

`/usr/share/common-licenses` (package `base-files`, always installed) holds ~48k words of licence
prose (GPL, LGPL, Apache, MPL, Artistic, GFDL, BSD, CC0). Split into sentences of 8-48 words,
de-duplicated and split train/val/test with a fixed seed, it gives:

* `{train,val,test}.txt`: one sentence a line (e.g. texts for `mmtrain surrogate trajectory`);
* `{train,val,test}.jsonl`: text-only instruction samples (no image) asking to continue a
  sentence from its first half; mixed into image-text training they keep a surrogate's
  translator a faithful stand-in for the layers it replaces.

Everything is derived from the installed files and the seed, so preparing twice on one system
gives identical files; `info.json` records each source file's sha256 and the package version.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmtrain.assets.common import Asset, AssetError, apt_install, debian_package_version, sha256_file, write_jsonl
from mmtrain.assets.splits import SPLITS, split_items, write_json

PACKAGE = "base-files"
SOURCE_DIR = Path("/usr/share/common-licenses")
SEED = 0
MIN_WORDS, MAX_WORDS = 8, 48
INSTRUCTION = "Continue this text:"
_SENTENCE_END = re.compile(r"(?<=[.;!?])\s+(?=[A-Z\"(])")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def source_files(root: Path = SOURCE_DIR) -> list[Path]:
    """The licence files, each once (several names are links to one file), in name order."""
    seen: set[Path] = set()
    files = []
    for path in sorted(root.iterdir()):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            files.append(path)
    return files


def sentences(text: str) -> list[str]:
    """Sentences of 8-48 words from running text: paragraphs re-joined, whitespace collapsed."""
    found = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if MIN_WORDS <= len(words) <= MAX_WORDS and sentence[:1].isupper() and sum(c.isalpha() for c in sentence) > 0.6 * len(sentence):
                found.append(" ".join(words))
    return found


def continuation_sample(sentence: str, index: int) -> dict:
    """A text-only instruction: the first half of the sentence in, the rest out."""
    words = sentence.split()
    half = len(words) // 2
    return {"id": f"prose-{index:05d}", "image": None, "conversations": [
        {"from": "human", "value": f"{INSTRUCTION} {' '.join(words[:half])}"},
        {"from": "gpt", "value": " ".join(words[half:])},
    ]}


def build(staging: Path) -> None:
    """Writes the prose texts, text-only manifests and info file into `staging`."""
    apt_install([PACKAGE])
    if not SOURCE_DIR.is_dir():
        raise AssetError(f"{SOURCE_DIR} does not exist although {PACKAGE} is installed")
    files = source_files()
    collected: dict[str, None] = {}
    for path in files:
        for sentence in sentences(path.read_text(encoding="utf-8", errors="replace")):
            collected.setdefault(sentence, None)
    if len(collected) < 300:
        raise AssetError(f"only {len(collected)} usable sentences under {SOURCE_DIR}; expected well over 300")
    splits = split_items(list(collected), key=lambda s: s, seed=SEED)
    for name in SPLITS:
        (staging / f"{name}.txt").write_text("".join(s + "\n" for s in splits[name]), encoding="utf-8")
        write_jsonl(staging / f"{name}.jsonl", (continuation_sample(s, i) for i, s in enumerate(splits[name])))
    write_json(staging / "info.json", {
        "package": PACKAGE, "package_version": debian_package_version(PACKAGE), "source": str(SOURCE_DIR),
        "files": {p.name: sha256_file(p) for p in files}, "seed": SEED,
        "words_per_sentence": [MIN_WORDS, MAX_WORDS], "counts": {name: len(splits[name]) for name in SPLITS},
    })


ASSETS: list[Asset] = [
    Asset(name="prose", kind="data", build=build, licence="the licences' own terms (verbatim redistribution)",
          description="~630 English sentences from Debian's licence texts: text-only instructions and plain texts"),
]
