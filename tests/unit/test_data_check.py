"""Tests for mmtrain.data.check: the manifest report and the command's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmtrain.data.check import CheckReport, check_manifest, main
from mmtrain.data.synthetic import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = ["a red circle.", "a blue square.", "What is it?"] * 5
    return make_tiny_tokenizer(texts, tmp_path_factory.mktemp("tok"), 320)


def _mixed_manifest(folder: Path) -> Path:
    Image.new("RGB", (6, 6), (255, 0, 0)).save(folder / "good.png")
    noise = Image.effect_noise((64, 64), 100).convert("RGB")
    noise.save(folder / "noise.png")
    data = (folder / "noise.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    lines = [
        json.dumps({"image": "good.png", "text": "a red circle."}),              # 1 ok
        json.dumps({"image": "missing.png", "text": "a red circle."}),           # 2 missing image
        "",
        json.dumps({"image": "good.png", "text": " "}),                          # 4 empty text
        "{broken",                                                               # 5 bad JSON
        json.dumps({"image": "cut.png", "text": "a blue square."}),              # 6 truncated
        json.dumps({"image": "good.png", "text": "a red circle. " * 20}),        # 7 too long with a tokenizer
        json.dumps({"conversations": [{"from": "human", "value": "What is it?"},
                                      {"from": "gpt", "value": "a blue square."}]}),  # 8 ok
        json.dumps({"image": "missing.png", "text": "   ", "id": 3}),            # 9 two problems
    ]
    manifest = folder / "mixed.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_report_without_tokenizer(tmp_path: Path) -> None:
    manifest = _mixed_manifest(tmp_path)
    report = check_manifest(manifest, num_workers=2)
    assert isinstance(report, CheckReport)
    assert (report.num_lines, report.num_ok) == (8, 3)
    assert [line for line, _ in report.problems] == [2, 4, 5, 6, 9, 9]
    reasons = dict(report.problems[:4])
    assert reasons[2].startswith("image file not found")
    assert "empty text" in reasons[4]
    assert "not valid JSON" in reasons[5]
    assert reasons[6].startswith("truncated or corrupt image data")
    text = report.format()
    assert f"{manifest}:2: image file not found: " in text
    assert f"{manifest}:5: not valid JSON" in text
    assert "checked 8 samples: 3 ok, 5 bad" in text.splitlines()[-2]
    assert not report.ok


def test_report_with_tokenizer_checks_length(tmp_path: Path, tokenizer_dir: Path) -> None:
    manifest = _mixed_manifest(tmp_path)
    report = check_manifest(manifest, tokenizer=tokenizer_dir, max_length=60, template="chat", num_image_tokens=4)
    assert (report.num_lines, report.num_ok) == (8, 2)
    problems = dict(report.problems)
    assert problems[7].startswith("text longer than the context: ") and problems[7].endswith("> data.max_length 60")
    assert check_manifest(manifest, tokenizer=tokenizer_dir, max_length=1000).num_ok == 3


def test_clean_manifest_and_file_level_problems(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n")
    report = check_manifest(clean)
    assert report.ok and (report.num_lines, report.num_ok) == (1, 1)
    assert report.format() == "checked 1 samples: 1 ok, 0 bad"
    missing = check_manifest(tmp_path / "missing.jsonl")
    assert missing.problems == [(0, "manifest file not found")] and not missing.ok
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no samples" in check_manifest(empty).problems[0][1]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        check_manifest(clean, max_length=10)


def test_main_exit_codes(tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _mixed_manifest(tmp_path)
    assert main([str(manifest)]) == 1
    assert "checked 8 samples: 3 ok, 5 bad" in capsys.readouterr().out
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"image": "good.png", "text": "a red circle."}) + "\n")
    assert main([str(clean), "--tokenizer", str(tokenizer_dir), "--max-length", "64",
                 "--template", "chatml", "--num-image-tokens", "8"]) == 0
    assert "1 ok, 0 bad" in capsys.readouterr().out
    assert main([str(clean), "--tokenizer", str(tmp_path / "no-tokenizer")]) == 2
    with pytest.raises(SystemExit):
        main([str(clean), "--max-length", "5"])


def test_length_check_counts_the_no_image_text(tmp_path: Path, tokenizer_dir: Path) -> None:
    manifest = tmp_path / "text.jsonl"
    manifest.write_text(json.dumps({"conversations": [{"from": "human", "value": "What is it?"},
                                                      {"from": "gpt", "value": "a blue square."}]}) + "\n")
    plain = check_manifest(manifest, tokenizer=tokenizer_dir, max_length=1000)
    from transformers import AutoTokenizer

    from mmtrain.data.templates import get_template
    from mmtrain.data.manifest import read_manifest

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    length = len(get_template("plain").encode(read_manifest(manifest)[0], tokenizer, 0))
    assert plain.ok and check_manifest(manifest, tokenizer=tokenizer_dir, max_length=length).ok
    report = check_manifest(manifest, tokenizer=tokenizer_dir, max_length=length, no_image_text="Image: N/A\n")
    assert not report.ok and "text longer than the context" in report.problems[0][1]
