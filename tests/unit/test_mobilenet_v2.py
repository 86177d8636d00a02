"""MobileNetV2 tower: shapes, TF 'same' padding, the Keras .h5 converter against a NumPy copy of the
Keras graph, loading from a prepared folder, `blocks()`, and frozen BatchNorm staying in eval mode."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmtrain.config import ModelConfig, from_dict
from mmtrain.config.schema import VisionConfig
from mmtrain.models import build_vlm
from mmtrain.models.mobilenet_v2 import (
    KerasWeightsError, MobileNetV2Backbone, MobileNetV2Tower, SameConv2d, keras_h5_to_state_dict, save_pretrained,
    tf_same_padding,
)
from mmtrain.models.vision import build_vision_tower
from tests.conftest import TINY_LLM

# The Keras MobileNetV2 at alpha 1.0, written out independently of the module under test:
# per block (output channels, stride); block 0 has expansion 1, the others 6.
KERAS_BLOCKS = [(16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1), (64, 1), (96, 1),
                (96, 1), (96, 1), (160, 2), (160, 1), (160, 1), (320, 1)]
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def mobilenet(image_size: int, **vision) -> MobileNetV2Tower:
    return build_vision_tower(VisionConfig(kind="mobilenetv2", config={"image_size": image_size}, **vision), "sdpa")


# ---------------------------------------------------------------- shapes, transform, padding


@pytest.mark.parametrize("image_size, alpha, side", [(160, 1.0, 5), (100, 0.35, 4), (64, 0.35, 2)])
def test_random_tower_tokens_and_shapes(image_size, alpha, side):
    tower = build_vision_tower(VisionConfig(kind="mobilenetv2", config={"image_size": image_size, "alpha": alpha}),
                               "sdpa").eval()
    assert tower.num_tokens == side * side and tower.out_dim == 1280
    assert tower.image_shape == (3, image_size, image_size)
    with torch.no_grad():
        out = tower(torch.randn(2, *tower.image_shape))
    assert out.shape == (2, side * side, 1280)


def test_image_transform_resizes_whole_picture_and_scales_to_minus_one_one():
    tower = mobilenet(64)
    red = Image.new("RGB", (50, 30), (255, 0, 0))
    pixels = tower.image_transform(red)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0], torch.ones(64, 64))
    torch.testing.assert_close(pixels[1:], -torch.ones(2, 64, 64))
    # No crop: a stripe at the very left of a wide picture survives the transform.
    wide = Image.new("RGB", (200, 50), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 10, 50))
    assert tower.image_transform(wide)[:, :, 0].min() > 0.9
    grey = tower.image_transform(Image.new("L", (20, 20), 128))
    assert grey.shape == (3, 64, 64) and abs(float(grey.mean()) - (128 / 127.5 - 1)) < 1e-5


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (160, 3, 2, (0, 1)), (5, 3, 2, (1, 1)), (7, 3, 1, (1, 1)), (8, 1, 2, (0, 0)), (10, 3, 2, (0, 1)),
])
def test_tf_same_padding_values(size, kernel, stride, expected):
    assert tf_same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("stride, groups", [(2, 1), (2, 4), (1, 4)])
def test_same_conv_matches_explicit_tf_padding(size, stride, groups):
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, 3, stride=stride, groups=groups)
    x = torch.randn(1, 4, size, size)
    # TensorFlow: output ceil(size/stride); an odd total padding puts the extra pixel bottom/right.
    total = max((math.ceil(size / stride) - 1) * stride + 3 - size, 0)
    before, after = total // 2, total - total // 2
    expected = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, stride=stride, groups=groups)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / stride)
    torch.testing.assert_close(out, expected)
    if stride == 2 and size % 2 == 0:  # PyTorch's symmetric padding would be a different function here
        symmetric = F.conv2d(x, conv.weight, stride=stride, padding=1, groups=groups)
        assert not torch.allclose(out, symmetric)


# ---------------------------------------------------------------- Keras .h5 files and a NumPy reference


def keras_weights(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Random weights for every Keras layer of MobileNetV2 alpha 1.0, in Keras shapes and names."""
    rng = np.random.default_rng(seed)

    def kernel(*shape):
        fan_in = shape[0] * shape[1] * (shape[2] if shape[3] != 1 else 1)
        return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    def bn(channels):
        return {"gamma": rng.uniform(0.5, 1.5, channels), "beta": rng.normal(0, 0.1, channels),
                "moving_mean": rng.normal(0, 0.1, channels), "moving_variance": rng.uniform(0.5, 2.0, channels)}

    layers = {"Conv1": {"kernel": kernel(3, 3, 3, 32)}, "bn_Conv1": bn(32)}
    channels = 32
    for index, (out, _) in enumerate(KERAS_BLOCKS):
        prefix = "expanded_conv_" if index == 0 else f"block_{index}_"
        hidden = channels if index == 0 else channels * 6
        if index:
            layers[f"{prefix}expand"] = {"kernel": kernel(1, 1, channels, hidden)}
            layers[f"{prefix}expand_BN"] = bn(hidden)
        layers[f"{prefix}depthwise"] = {"kernel": kernel(3, 3, hidden, 1)}
        layers[f"{prefix}depthwise_BN"] = bn(hidden)
        layers[f"{prefix}project"] = {"kernel": kernel(1, 1, hidden, out)}
        layers[f"{prefix}project_BN"] = bn(out)
        channels = out
    layers["Conv_1"] = {"kernel": kernel(1, 1, 320, 1280)}
    layers["Conv_1_bn"] = bn(1280)
    return {name: {k: np.asarray(v, dtype=np.float32) for k, v in ws.items()} for name, ws in layers.items()}


def write_keras_h5(path, layers, layout: str = "keras3") -> None:
    """Write `layers` the way Keras saves a dog-breed model built on a nested MobileNetV2.

    keras3: model_weights/<backbone>/<layer>/<weight>; keras2 (plain model):
    model_weights/<layer>/<layer>/<weight>:0 with `depthwise_kernel` for depthwise layers.
    Both also carry a classifier head that the converter must ignore.
    """
    with h5py.File(path, "w") as h5:
        root = h5.create_group("model_weights")
        for layer, weights in layers.items():
            for name, value in weights.items():
                if layout == "keras3":
                    root.create_dataset(f"mobilenetv2_1.00_160/{layer}/{name}", data=value)
                else:
                    if name == "kernel" and layer.endswith("depthwise"):
                        name = "depthwise_kernel"
                    root.create_dataset(f"{layer}/{layer}/{name}:0", data=value)
        root.create_dataset("dense/dense/kernel", data=np.zeros((1280, 19), np.float32))
        root.create_dataset("dense/dense/bias", data=np.zeros(19, np.float32))


def reference_forward(layers, image_nhwc: np.ndarray) -> np.ndarray:
    """The Keras MobileNetV2 graph in NumPy (float64, NHWC), layer by layer as Keras builds it."""

    def windows(x, kernel_size, stride, pads):
        """(i, j, the input pixels kernel tap (i, j) sees at every output position)."""
        x = np.pad(x, ((0, 0), pads, pads, (0, 0)))
        out = (x.shape[1] - kernel_size) // stride + 1, (x.shape[2] - kernel_size) // stride + 1
        for i in range(kernel_size):
            for j in range(kernel_size):
                yield i, j, x[:, i:i + stride * (out[0] - 1) + 1:stride, j:j + stride * (out[1] - 1) + 1:stride, :]

    def conv(x, kernel, stride, pads):  # kernel (kh, kw, in, out)
        return sum(patch @ kernel[i, j] for i, j, patch in windows(x, kernel.shape[0], stride, pads))

    def depthwise_conv(x, kernel, stride, pads):  # kernel (kh, kw, channels, 1)
        return sum(patch * kernel[i, j, :, 0] for i, j, patch in windows(x, kernel.shape[0], stride, pads))

    def bn(x, name):
        w = {k: v.astype(np.float64) for k, v in layers[name].items()}
        return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + 1e-3) * w["gamma"] + w["beta"]

    def relu6(x):
        return np.clip(x, 0.0, 6.0)

    def k(name):
        return layers[name]["kernel"].astype(np.float64)

    x = image_nhwc.astype(np.float64)
    # Conv1: padding='same', stride 2 -> TF pads (0, 1) on an even side, (1, 1) on an odd one.
    total = max((math.ceil(x.shape[1] / 2) - 1) * 2 + 3 - x.shape[1], 0)
    x = relu6(bn(conv(x, k("Conv1"), 2, (total // 2, total - total // 2)), "bn_Conv1"))
    for index, (_, stride) in enumerate(KERAS_BLOCKS):
        prefix = "expanded_conv_" if index == 0 else f"block_{index}_"
        inputs = x
        if index:
            x = relu6(bn(conv(x, k(f"{prefix}expand"), 1, (0, 0)), f"{prefix}expand_BN"))
        if stride == 2:  # ZeroPadding2D(correct_pad(x, 3)) then a 'valid' depthwise conv
            adjust = 1 - x.shape[1] % 2
            x = depthwise_conv(x, k(f"{prefix}depthwise"), 2, (1 - adjust, 1))
        else:
            x = depthwise_conv(x, k(f"{prefix}depthwise"), 1, (1, 1))
        x = relu6(bn(x, f"{prefix}depthwise_BN"))
        x = bn(conv(x, k(f"{prefix}project"), 1, (0, 0)), f"{prefix}project_BN")
        if stride == 1 and inputs.shape[-1] == x.shape[-1]:
            x = inputs + x
    return relu6(bn(conv(x, k("Conv_1"), 1, (0, 0)), "Conv_1_bn"))


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    layers = keras_weights()
    path = tmp_path_factory.mktemp("keras") / "dogs.h5"
    write_keras_h5(path, layers)
    return path, layers


@pytest.mark.parametrize("image_size", [36, 33])  # even and odd sides before each stride-2 layer
def test_converted_weights_reproduce_the_keras_graph(keras_file, image_size):
    path, layers = keras_file
    backbone = MobileNetV2Backbone()
    backbone.load_state_dict(keras_h5_to_state_dict(path))
    tower = MobileNetV2Tower(backbone, image_size).eval()
    image = np.random.default_rng(1).uniform(-1, 1, (2, image_size, image_size, 3)).astype(np.float32)
    with torch.no_grad():
        tokens = tower(torch.from_numpy(image).permute(0, 3, 1, 2))
    expected = reference_forward(layers, image)  # NHWC: flattening H*W gives the same token order
    assert tokens.shape == (2, expected.shape[1] * expected.shape[2], 1280) and tokens.shape[1] == tower.num_tokens
    assert float(np.abs(expected).max()) > 0.5  # the comparison is not between two near-zero maps
    np.testing.assert_allclose(tokens.numpy(), expected.reshape(2, -1, 1280), rtol=1e-4, atol=1e-4)


def test_keras2_layout_converts_to_the_same_tensors(keras_file, tmp_path):
    path, layers = keras_file
    keras2 = tmp_path / "keras2.h5"
    write_keras_h5(keras2, layers, layout="keras2")
    first, second = keras_h5_to_state_dict(path), keras_h5_to_state_dict(keras2)
    assert first.keys() == second.keys() == MobileNetV2Backbone().state_dict().keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key])
    torch.testing.assert_close(first["blocks.3.depthwise.conv.weight"][:, 0],
                               torch.from_numpy(layers["block_3_depthwise"]["kernel"][:, :, :, 0]).permute(2, 0, 1))
    torch.testing.assert_close(first["head.bn.running_var"], torch.from_numpy(layers["Conv_1_bn"]["moving_variance"]))


def test_missing_layer_is_named(keras_file, tmp_path):
    _, layers = keras_file
    broken = dict(layers)
    del broken["block_5_project_BN"]
    path = tmp_path / "missing.h5"
    write_keras_h5(path, broken)
    with pytest.raises(KerasWeightsError, match=r"`block_5_project_BN` is missing.*blocks\.5\.project"):
        keras_h5_to_state_dict(path)


def test_renamed_weight_is_named(keras_file, tmp_path):
    _, layers = keras_file
    broken = dict(layers)
    broken["block_3_depthwise_BN"] = {("moving_var" if k == "moving_variance" else k): v
                                      for k, v in layers["block_3_depthwise_BN"].items()}
    path = tmp_path / "renamed.h5"
    write_keras_h5(path, broken)
    with pytest.raises(KerasWeightsError, match="`block_3_depthwise_BN` has no `moving_variance`"):
        keras_h5_to_state_dict(path)


def test_wrong_width_is_named(keras_file):
    path, _ = keras_file
    with pytest.raises(KerasWeightsError, match=r"`Conv1` weight `kernel`.*alpha=0.5"):
        keras_h5_to_state_dict(path, alpha=0.5)


def test_file_without_mobilenet_fails_clearly(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("model_weights/dense/dense/kernel", data=np.zeros((2, 2)))
    with pytest.raises(KerasWeightsError, match="no MobileNetV2 layers found"):
        keras_h5_to_state_dict(path)


# ---------------------------------------------------------------- the tower through the registry


def test_pretrained_folder_loads_through_registry(keras_file, tmp_path, monkeypatch):
    path, _ = keras_file
    folder = tmp_path / "models" / "mobilenetv2"
    save_pretrained(keras_h5_to_state_dict(path), folder, {"image_size": 64, "alpha": 1.0})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    by_path = build_vision_tower(VisionConfig(kind="mobilenetv2", name_or_path=str(folder)), "sdpa").eval()
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path))
    by_name = build_vision_tower(VisionConfig(kind="mobilenetv2", name_or_path="mobilenetv2"), "sdpa").eval()
    assert by_path.image_shape == (3, 64, 64) and by_path.num_tokens == 4
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(by_path(pixels), by_name(pixels))
    expected = keras_h5_to_state_dict(path)
    for key, value in by_path.backbone.state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_missing_pretrained_folder_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mmtrain assets prepare mobilenetv2"):
        build_vision_tower(VisionConfig(kind="mobilenetv2", name_or_path="mobilenetv2"), "sdpa")


def test_bad_config_keys_and_feature_layer_fail_clearly():
    with pytest.raises(ValueError, match="unknown key.*imagesize.*valid keys: image_size, alpha"):
        build_vision_tower(VisionConfig(kind="mobilenetv2", config={"imagesize": 64}), "sdpa")
    with pytest.raises(ValueError, match="feature_layer=19 is out of range"):
        mobilenet(64, feature_layer=19)


def test_blocks_and_earlier_feature_layers():
    tower = mobilenet(64)
    assert len(tower.blocks()) == 17
    assert all(type(b).__name__ == "InvertedResidual" for b in tower.blocks())
    assert [b.stride for b in tower.blocks()] == [s for _, s in KERAS_BLOCKS]
    below = mobilenet(64, feature_layer=-3)  # the output of block 15: 160 channels at stride 32
    assert len(below.blocks()) == 16 and below.backbone.head is None
    assert below.out_dim == 160 and below.num_tokens == 4
    with torch.no_grad():
        assert below.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4, 160)
    stem = mobilenet(64, feature_layer=0)
    assert stem.out_dim == 32 and stem.num_tokens == 32 * 32 and stem.blocks() == []


# ---------------------------------------------------------------- BatchNorm of frozen parts


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    tower = mobilenet(64)
    tower.requires_grad_(False)
    tower.blocks()[-1].requires_grad_(True)
    tower.train()
    assert tower.training
    assert not tower.backbone.stem.bn.training and not tower.blocks()[0].depthwise.bn.training
    assert tower.blocks()[-1].depthwise.bn.training  # trainable BN still trains
    frozen_stats = tower.blocks()[0].project.bn.running_mean.clone()
    trained_stats = tower.blocks()[-1].project.bn.running_mean.clone()
    tower(torch.randn(2, 3, 64, 64)).sum().backward()
    torch.testing.assert_close(tower.blocks()[0].project.bn.running_mean, frozen_stats)
    assert not torch.equal(tower.blocks()[-1].project.bn.running_mean, trained_stats)


def test_frozen_tower_in_the_vlm_runs_in_eval_mode(tiny_assets):
    cfg = from_dict(ModelConfig, {
        "vision": {"kind": "mobilenetv2", "config": {"image_size": 32, "alpha": 0.35}},
        "resampler": {"num_queries": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 4},
        "llm": {"config": dict(TINY_LLM), "tokenizer": str(tiny_assets["tokenizer"])},
    })
    model, _, _ = build_vlm(cfg)
    model.train()
    batchnorms = [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batchnorms) == 52 and not any(m.training for m in batchnorms)
    before = [m.running_var.clone() for m in batchnorms]
    model.encode_images(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(m.running_var, b) for m, b in zip(batchnorms, before))
