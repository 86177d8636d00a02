"""Fixed train/val/test splits of a data asset, reproducible from a seed alone.

The split of an item depends only on its key, its category, the fractions and the seed: items are
sorted by their key first, and each category is shuffled by its own `random.Random` seeded with a
string (hashed with SHA-512 by `random`), so neither the input order nor `PYTHONHASHSEED` changes
the result. Also here: the small bits every data asset writes next to its manifests.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mmtrain.assets.common import write_jsonl

T = TypeVar("T")

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, ...] = (0.8, 0.1, 0.1)


def split_items(items: Iterable[T], key: Callable[[T], str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                seed: int = 0, stratify: Callable[[T], str] | None = None) -> dict[str, list[T]]:
    """Splits items into disjoint train/val/test lists, the same way on every machine and run.

    Each category of `n` items (all items are one category without `stratify`) is cut into splits
    of `n * fraction` items, rounded by largest remainder; a category of at least three items gets
    at least one item in every split with a non-zero fraction.

    Args:
        items: What to split (any objects).
        key: A stable, unique string per item (a path, an id); it fixes the order before shuffling.
        fractions: Share of train, val and test; non-negative, summing to 1.
        seed: Seed of the shuffle.
        stratify: The category of an item; when given, each category is split on its own.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`, each list sorted by key.

    Raises:
        ValueError: The fractions are not three non-negative numbers summing to 1, or two items
            share a key (the order would then depend on the input order).
    """
    fractions = _checked_fractions(fractions)
    keyed: dict[str, T] = {}
    for item in items:
        item_key = key(item)
        if not isinstance(item_key, str):
            raise ValueError(f"split key {item_key!r} is not a string; the key function must return a str")
        if item_key in keyed:
            raise ValueError(f"two items share the split key {item_key!r}; keys must be unique")
        keyed[item_key] = item
    strata: dict[str, list[str]] = {}
    for item_key in sorted(keyed):
        category = "" if stratify is None else stratify(keyed[item_key])
        strata.setdefault(str(category), []).append(item_key)

    chosen: dict[str, list[str]] = {name: [] for name in SPLITS}
    for category in sorted(strata):
        keys = strata[category]
        random.Random(f"mmtrain-split:{seed}:{category}").shuffle(keys)
        start = 0
        for name, count in zip(SPLITS, _split_sizes(len(keys), fractions)):
            chosen[name].extend(keys[start:start + count])
            start += count
    return {name: [keyed[k] for k in sorted(chosen[name])] for name in SPLITS}


def split_by_caption(records: Iterable[T], seed: int = 0) -> dict[str, list[T]]:
    """Train/val/test captioned pictures, stratified by category, pictures sharing a caption in one split
    (so no test caption was trained on under another picture). Records have `.caption`, `.category`
    and a unique `.id`; each split is sorted by id."""
    by_caption: dict[str, list[T]] = {}
    for record in records:
        by_caption.setdefault(record.caption, []).append(record)
    groups = split_items(by_caption.values(), key=lambda group: group[0].caption, seed=seed,
                         stratify=lambda group: group[0].category)
    return {name: sorted((r for group in groups[name] for r in group), key=lambda r: r.id) for name in SPLITS}


def write_caption_splits(staging: Path, records: Sequence[T], splits: dict[str, list[T]],
                         image: Callable[[T], str]) -> dict[str, Any]:
    """Writes `{train,val,test}.jsonl` caption records (`id`, `image`, `text`, `category`) into
    `staging`, and returns what every captioning asset's `info.json` says of them: the split seed's
    fractions, counts and categories per split, and how many distinct captions `records` have."""
    for name in SPLITS:
        write_jsonl(staging / f"{name}.jsonl", ({"id": r.id, "image": image(r), "text": r.caption,
                                                 "category": r.category} for r in splits[name]))
    return {"fractions": list(DEFAULT_FRACTIONS),
            "counts": {name: len(splits[name]) for name in SPLITS},
            "categories": {name: count_by(r.category for r in splits[name]) for name in SPLITS},
            "distinct_captions": len({r.caption for r in records})}


def _checked_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS) or any(not math.isfinite(f) or f < 0 for f in values) \
            or not math.isclose(sum(values), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers (for {', '.join(SPLITS)}) "
                         f"summing to 1, got {tuple(fractions)!r}")
    return values


def _split_sizes(total: int, fractions: tuple[float, ...]) -> list[int]:
    """Sizes summing to `total`: largest remainder, then at least one per split that asks for any."""
    exact = [total * f for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[:total - sum(sizes)]:
        sizes[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if total >= len(wanted):
        for i in wanted:
            if sizes[i] == 0:
                donor = max(range(len(sizes)), key=lambda j: (sizes[j], -j))
                sizes[donor] -= 1
                sizes[i] += 1
    return sizes


def count_by(values: Iterable[Any]) -> dict[str, int]:
    """Counts of each value, as a dict sorted by value (for info files)."""
    return dict(sorted(Counter(str(v) for v in values).items()))


def write_json(path: Path, data: Any) -> None:
    """Writes `data` as stable, indented JSON (sorted keys) so two preparations compare equal."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
