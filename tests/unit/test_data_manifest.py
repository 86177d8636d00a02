"""Tests for mmtrain.data.manifest and the manifest errors."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

from mmtrain.data.errors import BadSampleError, ManifestError
from mmtrain.data.manifest import Sample, read_manifest, scan_manifest


def _write(path: Path, lines: list[object | str]) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_captions_and_conversations_with_paths_relative_to_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    manifest = _write(folder / "m.jsonl", [
        {"image": "images/a.png", "text": "a red circle."},
        "",
        {"id": 7, "category": "qa", "image": "b.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]},
        "   ",
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"image": None, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"image": "/abs/c.png", "text": "t"},
    ])
    samples = read_manifest(manifest)
    assert [s.line for s in samples] == [1, 3, 5, 6, 7]
    assert samples[0] == Sample(manifest, 1, folder / "images/a.png", "a red circle.", None, None)
    assert samples[1].image == folder / "b.png"
    assert samples[1].text is None
    assert samples[1].conversations == (("human", "<image>\nWhat?"), ("gpt", "A square."))
    assert samples[1].category == "qa"
    assert samples[2].image is None and not samples[2].has_image
    assert samples[3].image is None
    assert samples[4].image == Path("/abs/c.png")
    assert all(s.manifest == manifest for s in samples)


def test_accepts_str_path_and_utf8_bom(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes("\ufeff".encode() + json.dumps({"image": "a.png", "text": "ü"}).encode() + b"\r\n")
    (sample,) = read_manifest(str(manifest))
    assert sample.text == "ü"


BAD_RECORDS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ({"image": "a.png", "text": "t", "caption": "x"}, 'unknown key "caption"'),
    ({"image": "a.png"}, 'expected "text" (a string) or "conversations" (a list)'),
    ({"image": "a.png", "text": 3}, '"text" is a number'),
    ({"image": "a.png", "text": "t", "conversations": []}, "not both"),
    ({"text": "t"}, 'needs an "image"'),
    ({"image": 5, "text": "t"}, '"image" must be a path string or null'),
    ({"image": "", "text": "t"}, '"image" is an empty string'),
    ({"image": "a.png", "text": "t", "category": 1}, '"category" must be a string'),
    ({"conversations": "hi"}, '"conversations" must be a list'),
    ({"conversations": []}, "empty list"),
    ({"conversations": ["hi"]}, "turn 1 must be an object"),
    ({"conversations": [{"from": "human"}]}, 'turn 1 has no "value"'),
    ({"conversations": [{"from": "human", "value": "a", "x": 1}]}, 'turn 1 has unknown key "x"'),
    ({"conversations": [{"from": "bot", "value": "a"}]}, '"from" must be "human" or "gpt"'),
    ({"conversations": [{"from": "human", "value": 1}]}, '"value" must be a string'),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "must alternate"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "must alternate"),
    ({"conversations": [{"from": "human", "value": "a"}]}, 'no "gpt" turn'),
]


@pytest.mark.parametrize(("record", "expected"), BAD_RECORDS)
def test_schema_problems_name_file_and_line(tmp_path: Path, record: object, expected: str) -> None:
    manifest = _write(tmp_path / "m.jsonl", [{"image": "a.png", "text": "ok"}, "", record])
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    error = caught.value
    assert (error.manifest, error.line) == (manifest, 3)
    assert expected in error.reason
    assert str(error).startswith(f"{manifest}:3: {error.reason}")


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.jsonl", [{"image": "a.png", "text": "t", "url": "x"}])
    with pytest.raises(ManifestError, match=r'"answer", "category", "conversations", "id", "image", "options", "text"'):
        read_manifest(manifest)


def test_multiple_choice_records(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "B"}]
    good = {"image": "a.png", "conversations": turns, "options": ["cat", "dog"], "answer": 1, "id": "q1"}
    sample = read_manifest(_write(tmp_path / "ok.jsonl", [good]))[0]
    assert (sample.options, sample.answer, sample.id) == (("cat", "dog"), 1, "q1")
    broken = {
        "out of range": ({**good, "answer": 2}, r"\"answer\" must be the index \(0 to 1\)"),
        "duplicates": ({**good, "options": ["cat", "cat"]}, "duplicates"),
        "alone": ({k: v for k, v in good.items() if k != "answer"}, '"options" and "answer" go together'),
        "one option": ({**good, "options": ["cat"], "answer": 0}, "at least two"),
    }
    for name, (record, expected) in broken.items():
        with pytest.raises(ManifestError, match=expected):
            read_manifest(_write(tmp_path / f"{name}.jsonl", [record]))


def test_non_utf8_line_is_a_manifest_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"image": "a.png", "text": "ok"}\n{"image": "a.png", "text": "\xff"}\n')
    with pytest.raises(ManifestError, match="not UTF-8") as caught:
        read_manifest(manifest)
    assert caught.value.line == 2


def test_missing_and_empty_manifest(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ManifestError) as caught:
        read_manifest(missing)
    assert caught.value.line == 0
    assert str(caught.value).startswith(f"{missing}:0: manifest file not found")
    empty = _write(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(ManifestError, match="no samples"):
        read_manifest(empty)
    with pytest.raises(ManifestError, match="directory"):
        read_manifest(tmp_path)


def test_scan_manifest_reports_every_broken_line(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.jsonl", ["{", {"image": "a.png", "text": "t"}, {"bad": 1}])
    items = list(scan_manifest(manifest))
    assert [type(item) for item in items] == [ManifestError, Sample, ManifestError]
    assert [item.line for item in items] == [1, 2, 3]


def test_error_strings_carry_hints_and_pickle() -> None:
    bad = BadSampleError(Path("m.jsonl"), 4, "empty text")
    assert str(bad) == (
        "m.jsonl:4: empty text (fix or remove the line, or set data.bad_samples=skip to skip such samples)"
    )
    assert str(ManifestError("m.jsonl", 2, "not valid JSON")).startswith("m.jsonl:2: not valid JSON (")
    for error in (bad, ManifestError("m.jsonl", 2, "x", hint="h")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
    assert isinstance(bad, ValueError)
    message_only = BadSampleError("Caught BadSampleError in DataLoader worker process 0.")
    assert str(message_only) == "Caught BadSampleError in DataLoader worker process 0."
    assert str(pickle.loads(pickle.dumps(message_only))) == str(message_only)


def test_a_llava_json_array_reads_as_is_with_unused_keys_warned_once(tmp_path, caplog):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    records = [{"id": f"r{i}", "image": f"coco/{i}.jpg", "model": "gpt-4", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"thing {i}"}]} for i in range(3)]
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
                    "source": "sharegpt"})
    path = tmp_path / "data" / "llava_mix.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING, logger="mmtrain.data.manifest"):
        samples = read_manifest(path, image_root=images)
    assert [s.id for s in samples] == ["r0", "r1", "r2", "text"]
    assert samples[1].image == images / "coco" / "1.jpg" and samples[3].image is None
    assert samples[0].conversations[1] == ("gpt", "thing 0")
    warnings = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warnings) == 1 and "model" in warnings[0] and "source" in warnings[0]
    assert read_manifest(path)[0].image == path.parent / "coco" / "0.jpg"  # default: the file's folder


def test_a_broken_llava_record_is_named_by_index(tmp_path):
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, good, {"image": "b.png", "conversations": [{"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ManifestError, match=r"bad\.json:2: .*should be from \"human\""):
        read_manifest(path)
    path.write_text(json.dumps({"image": "a.png"}))
    with pytest.raises(ManifestError, match=r"bad\.json:0: expected a JSON array of records, got an object"):
        read_manifest(path)
