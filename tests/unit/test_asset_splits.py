"""Tests for mmtrain.assets.splits: seeded, order- and hash-independent, disjoint, stratified splits."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmtrain.assets.splits import SPLITS, split_items

REPO = Path(__file__).resolve().parents[2]
ITEMS = [f"item{i:03d}" for i in range(200)]
CATEGORY_SIZES = {"big": 120, "mid": 40, "small": 10, "three": 3, "two": 2, "one": 1}
CATEGORIZED = [(f"{category}-{i:03d}", category) for category, size in CATEGORY_SIZES.items() for i in range(size)]


def _key(pair: tuple[str, str]) -> str:
    return pair[0]


def _category(pair: tuple[str, str]) -> str:
    return pair[1]


def test_the_same_split_whatever_the_input_order() -> None:
    expected = split_items(CATEGORIZED, key=_key, seed=3, stratify=_category)
    for attempt in range(5):
        shuffled = list(CATEGORIZED)
        random.Random(attempt).shuffle(shuffled)
        assert split_items(iter(shuffled), key=_key, seed=3, stratify=_category) == expected


def test_each_split_is_sorted_by_key_and_the_seed_changes_the_split() -> None:
    first = split_items(ITEMS, key=str, seed=0)
    assert all(first[name] == sorted(first[name]) for name in SPLITS)
    assert split_items(ITEMS, key=str, seed=0) == first
    assert split_items(ITEMS, key=str, seed=1)["test"] != first["test"]


def test_pinned_result_so_that_published_splits_never_move() -> None:
    items = [f"item{i:02d}" for i in range(20)]
    assert split_items(items, key=str, seed=0) == {
        "train": ["item00", "item01", "item02", "item04", "item06", "item07", "item08", "item09", "item10",
                  "item11", "item14", "item15", "item16", "item17", "item18", "item19"],
        "val": ["item03", "item13"],
        "test": ["item05", "item12"],
    }


def test_independent_of_the_python_hash_seed() -> None:
    # Set iteration order depends on PYTHONHASHSEED; the split must not.
    code = ("import json; from mmtrain.assets.splits import split_items; "
            "items = {f'{c}{i}' for c in 'abcdef' for i in range(30)}; "
            "print(json.dumps(split_items(items, key=str, seed=5, stratify=lambda s: s[0])))")
    outputs = set()
    for hash_seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(proc.stdout)
    assert len(outputs) == 1
    assert sum(len(v) for v in json.loads(outputs.pop()).values()) == 180


def test_splits_are_disjoint_and_cover_every_item() -> None:
    splits = split_items(CATEGORIZED, key=_key, seed=0, stratify=_category)
    seen = [item for name in SPLITS for item in splits[name]]
    assert len(seen) == len(set(seen)) == len(CATEGORIZED)
    assert set(seen) == set(CATEGORIZED)


def test_fractions_are_met_exactly_without_strata() -> None:
    sizes = {name: len(v) for name, v in split_items(range(1000), key=lambda i: f"{i:04d}").items()}
    assert sizes == {"train": 800, "val": 100, "test": 100}
    halves = split_items(range(1000), key=lambda i: f"{i:04d}", fractions=(0.5, 0.25, 0.25))
    assert {name: len(v) for name, v in halves.items()} == {"train": 500, "val": 250, "test": 250}
    no_test = split_items(range(10), key=str, fractions=(0.9, 0.1, 0.0))
    assert (len(no_test["train"]), len(no_test["val"]), len(no_test["test"])) == (9, 1, 0)


def test_stratified_every_category_of_three_or_more_is_in_every_split() -> None:
    splits = split_items(CATEGORIZED, key=_key, seed=0, stratify=_category)
    per_split = {name: Counter(category for _, category in splits[name]) for name in SPLITS}
    for category, size in CATEGORY_SIZES.items():
        sizes = tuple(per_split[name][category] for name in SPLITS)
        assert sum(sizes) == size
        if size >= 3:
            assert all(sizes), (category, sizes)
    assert tuple(per_split[name]["big"] for name in SPLITS) == (96, 12, 12)
    assert tuple(per_split[name]["mid"] for name in SPLITS) == (32, 4, 4)
    assert tuple(per_split[name]["small"] for name in SPLITS) == (8, 1, 1)
    assert tuple(per_split[name]["three"] for name in SPLITS) == (1, 1, 1)
    assert tuple(per_split[name]["two"] for name in SPLITS) == (2, 0, 0)
    assert tuple(per_split[name]["one"] for name in SPLITS) == (1, 0, 0)


def test_adding_a_category_leaves_the_others_where_they_were() -> None:
    base = split_items(CATEGORIZED, key=_key, seed=0, stratify=_category)
    grown = split_items(CATEGORIZED + [(f"new-{i}", "new") for i in range(10)], key=_key, seed=0, stratify=_category)
    for name in SPLITS:
        assert [p for p in grown[name] if p[1] != "new"] == base[name]


def test_duplicate_keys_and_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="share the split key 'a'"):
        split_items(["a", "b", "a"], key=str)
    with pytest.raises(ValueError, match="summing to 1"):
        split_items(ITEMS, key=str, fractions=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="non-negative"):
        split_items(ITEMS, key=str, fractions=(0.8, 0.2))
    with pytest.raises(ValueError, match="not a string"):
        split_items([1, 2, 3], key=lambda i: i)
