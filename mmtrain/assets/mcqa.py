"""A four-option multiple-choice QA set made from the prepared KGeography and Tux Paint assets.

Three kinds of question, each about one real picture, whose right answer is the picture's own
metadata and whose three wrong options are the same metadata of other pictures of the same split:

* `flag-country`: a flag -> "Which country or region does this flag belong to?";
* `flag-capital`: a flag -> "What is the capital of the country or region whose flag this is?";
* `picture-caption`: a Tux Paint stamp -> "What is shown in this picture?" (its caption); wrong
  options come from stamps of other categories when there are enough, so that the question has one
  right answer (a butterfly is not offered "A moth." as a wrong answer).

(No picture -> category question: Tux Paint files a butterfly under "seasonal" as well as
"animals", so such a question would often have two right answers.)

An option never repeats another or the answer, not even up to case and a final full stop. The
questions of a split come from the same split of the source, so a test picture is only ever asked
about in the test split. Where the right answer stands among the four options is drawn with a
seeded generator, balanced: each letter is right for a quarter of each kind's questions (+-1).
Everything is derived from the seed, so preparing twice gives byte-identical files.

Reads `MMTRAIN_CACHE/data/{kgeography,tuxpaint}` (prepare those first); writes
`{train,val,test}.jsonl` and `info.json`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from mmtrain.assets import kgeography, tuxpaint
from mmtrain.assets.common import Asset, AssetError, prepared_source_dir, sha256_file, write_jsonl
from mmtrain.assets.splits import SPLITS, count_by, write_json
from mmtrain.data.errors import ManifestError
from mmtrain.data.manifest import read_manifest

SEED = 0
LETTERS = "ABCD"
INSTRUCTION = "Answer with the option's letter."
CAPTION_QUESTION = "What is shown in this picture?"
SOURCES: dict[str, Asset] = {asset.name: asset for asset in (*tuxpaint.ASSETS, *kgeography.ASSETS)}


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question and where its facts come from."""

    name: str
    question: str
    source: str
    """The asset whose manifests hold the facts."""
    manifest: str
    """File name of a split's manifest in the source asset, with `{split}`."""
    prefer_other_category: bool
    """Draw wrong options from facts of other categories first."""


KINDS: tuple[QuestionKind, ...] = (
    QuestionKind("flag-country", kgeography.FLAG_QUESTION, "kgeography", "flags_{split}.jsonl", False),
    QuestionKind("flag-capital", kgeography.CAPITAL_QUESTION, "kgeography", "capitals_{split}.jsonl", False),
    QuestionKind("picture-caption", CAPTION_QUESTION, "tuxpaint", "{split}.jsonl", True),
)


@dataclass(frozen=True)
class Fact:
    """A picture and the one right answer about it."""

    id: str
    image: str
    answer: str
    category: str


def comparable(text: str) -> str:
    """What two options are compared by: case, spacing and a final full stop do not count."""
    return " ".join(text.split()).casefold().rstrip(".").strip()


def read_facts(manifest: Path) -> list[Fact]:
    """Facts from a prepared manifest: the caption, or the answer of a one-question conversation.

    Raises:
        AssetError: The manifest is missing or invalid, or a record lacks an image or an id.
    """
    try:
        samples = read_manifest(manifest)
    except ManifestError as error:
        raise AssetError(f"cannot read the source manifest: {error}") from None
    facts = []
    for sample in samples:
        answer = sample.text if sample.text is not None else sample.conversations[-1][1]
        if sample.image is None or sample.id is None or not answer.strip():
            raise AssetError(f"{manifest}:{sample.line}: a source record needs an image, an id and an answer")
        facts.append(Fact(id=str(sample.id), image=str(sample.image), answer=answer.strip(),
                          category=sample.category or ""))
    return facts


def choose_distractors(fact: Fact, facts: list[Fact], rng: random.Random, prefer_other_category: bool,
                       count: int = len(LETTERS) - 1) -> list[str]:
    """`count` wrong answers for `fact`, drawn from the other facts, all distinct from each other.

    Raises:
        AssetError: Fewer than `count` distinct wrong answers exist.
    """
    taken = {comparable(fact.answer)}
    preferred: list[str] = []
    others: list[str] = []
    for other in sorted(facts, key=lambda f: (f.answer, f.id)):
        key = comparable(other.answer)
        if key in taken:
            continue
        taken.add(key)
        (preferred if prefer_other_category and other.category != fact.category else others).append(other.answer)
    if len(preferred) + len(others) < count:
        raise AssetError(f"only {len(preferred) + len(others)} distinct wrong answers for {fact.id!r}; "
                         f"{count} are needed")
    chosen = rng.sample(preferred, min(count, len(preferred)))
    return chosen + rng.sample(others, count - len(chosen))


def make_questions(kind: QuestionKind, facts: list[Fact], seed: int, split: str) -> list[dict]:
    """The multiple-choice records of one kind for the facts of one split, in fact-id order."""
    facts = sorted(facts, key=lambda f: f.id)
    rng = random.Random(f"mmtrain-mcqa:{seed}:{kind.name}:{split}")
    positions = [i % len(LETTERS) for i in range(len(facts))]
    rng.shuffle(positions)
    records = []
    for fact, position in zip(facts, positions):
        options = choose_distractors(fact, facts, rng, kind.prefer_other_category)
        rng.shuffle(options)
        options.insert(position, fact.answer)
        listed = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
        records.append({
            "id": f"{kind.name}/{fact.id}", "image": fact.image, "category": kind.name,
            "conversations": [{"from": "human", "value": f"<image>\n{kind.question}\n{listed}\n{INSTRUCTION}"},
                              {"from": "gpt", "value": LETTERS[position]}],
            "options": options, "answer": position,
        })
    return records


def build(staging: Path) -> None:
    """Writes the multiple-choice manifests and info file into `staging`."""
    sources: dict[str, dict[str, str]] = {}
    counts: dict[str, dict[str, int]] = {}
    letters: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        records = []
        for kind in KINDS:
            manifest = prepared_source_dir(SOURCES[kind.source], "mcqa") / kind.manifest.format(split=split)
            sources.setdefault(kind.source, {})[manifest.name] = sha256_file(manifest)
            records += make_questions(kind, read_facts(manifest), SEED, split)
        write_jsonl(staging / f"{split}.jsonl", records)
        counts[split] = count_by(r["category"] for r in records)
        letters[split] = count_by(LETTERS[r["answer"]] for r in records)
    write_json(staging / "info.json", {
        "seed": SEED, "counts": counts, "answer_letters": letters,
        "questions": {kind.name: kind.question for kind in KINDS},
        "sources_sha256": sources,
    })


ASSETS: list[Asset] = [
    Asset(name="mcqa", kind="data", build=build, requires=("tuxpaint", "kgeography"), licence="GPL-2.0-or-later",
          description="Multiple-choice QA (4 options) on real flags and Tux Paint pictures: country, capital, caption"),
]
