"""The Tux Paint, Scratch media and OpenClipart captioned pictures as one larger captioning set.

The union of the three prepared assets' manifests, split by split: each source keeps its own
train/val/test split, so a picture is in the same split here as in its source, and evaluating on
`asset:tuxpaint/test.jsonl` stays fair for a model trained on this set's `train.jsonl`. Each record
is the source's record with the source asset's name put in front of its `id`
(`tuxpaint:animals/amphibians/frog`, unique across sources) and of its `category`
(`scratch-media/animals`, so per-category results separate the sources), and its image path made
absolute (Scratch media's are relative to its own folder). The source is not a key of its own:
the manifest reader accepts only the keys it knows.

Held-out pictures must not be trained on under another name, so pictures are compared by the
sha256 of their file bytes across all sources:

* a train record whose picture equals a val or test picture of any source is dropped
  (`same_as_heldout`), and so is a val record whose picture equals a test picture (`same_as_test`);
* within a split, a picture already taken from an earlier source (in the order tuxpaint,
  scratch-media, openclipart) or earlier in the same manifest is dropped (`duplicate`).

Reads `MMTRAIN_CACHE/data/{tuxpaint,scratch-media,openclipart}` (prepare those first); writes
`{train,val,test}.jsonl` and `info.json` (counts per source and split, what was dropped and why,
the sha256 of every source manifest read).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmtrain.assets import openclipart, scratch_media, tuxpaint
from mmtrain.assets.common import Asset, AssetError, prepared_source_dir, sha256_file, write_jsonl
from mmtrain.assets.splits import SPLITS, write_json

SOURCES: dict[str, Asset] = {asset.name: asset
                             for asset in (*tuxpaint.ASSETS, *scratch_media.ASSETS, *openclipart.ASSETS)}
"""The source assets, in the order their records are taken."""
HELD_OUT_BY = {"train": ("val", "test"), "val": ("test",), "test": ()}
"""Which splits' pictures a split may not share."""
DROP_REASONS = {"train": "same_as_heldout", "val": "same_as_test"}


def read_records(manifest: Path, source: str) -> list[dict]:
    """The records of one source manifest, id and category prefixed with `source`, image path absolute.

    Raises:
        AssetError: A line is not a JSON object with an `image` and a `text`.
    """
    records = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise AssetError(f"{manifest}:{number}: not valid JSON ({error}); prepare `{source}` again "
                             f"(`mmtrain assets prepare --force {source}`)") from None
        if not isinstance(record, dict) or not record.get("image") or not record.get("text"):
            raise AssetError(f"{manifest}:{number}: not a caption record with an image and a text; prepare "
                             f"`{source}` again (`mmtrain assets prepare --force {source}`)")
        image = Path(record["image"])
        records.append({**record, "id": f"{source}:{record.get('id', number)}",
                        "image": str(image if image.is_absolute() else (manifest.parent / image).resolve()),
                        "category": f"{source}/{record['category']}" if record.get("category") else source})
    return records


def source_of(record: dict) -> str:
    """The source asset a mixed record comes from (the start of its id)."""
    return str(record["id"]).split(":", 1)[0]


def mix(manifests: dict[str, dict[str, Path]]) -> tuple[dict[str, list[dict]], dict[str, dict[str, dict[str, int]]]]:
    """The mixed records of each split, and the dropped records counted by split, source and reason.

    Args:
        manifests: source name -> split -> manifest path, sources in the order they are taken.

    Raises:
        AssetError: A manifest is malformed or names a picture that does not exist.
    """
    records = {split: [r for source, files in manifests.items() for r in read_records(files[split], source)]
               for split in SPLITS}
    digests: dict[str, str] = {}

    def digest(record: dict) -> str:
        image = record["image"]
        if image not in digests:
            path = Path(image)
            if not path.is_file():
                source = source_of(record)
                raise AssetError(f"{source} lists the picture {image}, which does not exist; prepare "
                                 f"`{source}` again (`mmtrain assets prepare --force {source}`)")
            digests[image] = sha256_file(path)
        return digests[image]

    held = {split: {digest(r) for r in records[split]} for split in SPLITS}
    kept: dict[str, list[dict]] = {}
    dropped: dict[str, dict[str, dict[str, int]]] = {}
    for split in SPLITS:
        forbidden = set().union(*(held[other] for other in HELD_OUT_BY[split]))
        seen: set[str] = set()
        kept[split] = []
        for record in records[split]:
            key = digest(record)
            reason = DROP_REASONS[split] if key in forbidden else "duplicate" if key in seen else ""
            if reason:
                counts = dropped.setdefault(split, {}).setdefault(source_of(record), {})
                counts[reason] = counts.get(reason, 0) + 1
                continue
            seen.add(key)
            kept[split].append(record)
    return kept, dropped


def build(staging: Path) -> None:
    """Writes the mixed manifests and info file into `staging`."""
    folders = {name: prepared_source_dir(asset, "captions-mix") for name, asset in SOURCES.items()}
    manifests = {name: {split: folders[name] / f"{split}.jsonl" for split in SPLITS} for name in SOURCES}
    kept, dropped = mix(manifests)
    for split in SPLITS:
        write_jsonl(staging / f"{split}.jsonl", kept[split])
    write_json(staging / "info.json", {
        "sources": list(SOURCES),
        "counts": {split: {name: sum(source_of(r) == name for r in kept[split]) for name in SOURCES}
                   for split in SPLITS},
        "totals": {split: len(kept[split]) for split in SPLITS},
        "distinct_captions": {split: len({r["text"] for r in kept[split]}) for split in SPLITS},
        "dropped": dropped,
        "sources_sha256": {name: {path.name: sha256_file(path) for path in files.values()}
                           for name, files in manifests.items()},
    })


ASSETS: list[Asset] = [
    Asset(name="captions-mix", kind="data", build=build, requires=tuple(SOURCES),
          licence="GPL-2.0 (tuxpaint), CC-BY-SA-3.0 (scratch-media), public domain (openclipart)",
          description="Tux Paint + Scratch media + OpenClipart captions in one set (~3,200 pictures), splits kept"),
]
