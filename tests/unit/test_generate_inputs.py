"""`mmtrain generate --image` accepts image files, folders and manifests (JSONL and LLaVA's JSON arrays)."""

import json

import pytest
from PIL import Image

from mmtrain.eval.generate import GenerateInputError, collect_images


@pytest.fixture
def images(tmp_path):
    paths = []
    for name in ("b.png", "a.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_a_llava_json_array_gives_its_images(tmp_path, images):
    records = [{"id": str(i), "image": p.name,
                "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."}]}
               for i, p in enumerate(images)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    assert collect_images([str(tmp_path / "data.json")]) == images


def test_a_jsonl_manifest_and_a_folder(tmp_path, images):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": p.name, "text": "Red."}) + "\n" for p in images))
    assert collect_images([str(tmp_path / "m.jsonl")]) == images
    assert collect_images([str(tmp_path)]) == sorted(images)


def test_a_missing_path_names_itself(tmp_path):
    with pytest.raises(GenerateInputError, match="nope.png: no such file"):
        collect_images([str(tmp_path / "nope.png")])
