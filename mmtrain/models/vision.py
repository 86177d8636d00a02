"""Vision towers: a registry of image encoders that turn pixels into a sequence of features.

`hf` wraps any Hugging Face vision model (CLIP, SigLIP, ViT, DINOv2...) by name, local folder or
config dict. Other families (e.g. MobileNetV2) register a builder under their own `kind`.
Every tower exposes the same interface: `forward(pixel_values) -> [B, T, D]`, `out_dim`,
`num_tokens`, `image_shape`, `image_transform(pil) -> tensor` and `blocks()` for top-k training.
"""

from __future__ import annotations

import torch
from torch import nn

import mmtrain.models.mobilenet_v2  # noqa: F401  (registers the `mobilenetv2` family)
from mmtrain.config.errors import ConfigError
from mmtrain.config.schema import VisionConfig
from mmtrain.models.tower import VISION_TOWERS, VisionTower, register_vision_tower


def build_vision_tower(cfg: VisionConfig, attn_implementation: str) -> "VisionTower":
    """Build the tower named by `cfg.kind`."""
    if cfg.kind not in VISION_TOWERS:
        raise ValueError(
            f"model.vision.kind={cfg.kind!r} is not a known vision tower; choose one of: "
            f"{', '.join(sorted(VISION_TOWERS))}"
        )
    return VISION_TOWERS[cfg.kind](cfg, attn_implementation)



class HFVisionTower(VisionTower):
    """Any Hugging Face vision encoder; features from one hidden state, CLS optionally dropped."""

    def __init__(self, model: nn.Module, processor, feature_layer: int, drop_cls: bool, cls_every: int = 0) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.feature_layer = feature_layer
        self.cls_every = cls_every
        config = model.config
        size = processor_input_size(processor) or getattr(config, "image_size", 224)
        self.image_shape = (getattr(config, "num_channels", 3), size, size)
        self.out_dim = config.hidden_size
        patch = getattr(config, "patch_size", None)
        self._num_patches = (size // patch) ** 2 if patch else None
        self.drop_cls = drop_cls  # public: the exporter maps has_cls and drop_cls onto LLaVA settings
        with torch.no_grad():
            probe = self._hidden(torch.zeros(1, *self.image_shape))
        self.has_cls = self._num_patches is not None and probe.shape[1] == self._num_patches + 1
        self.num_tokens = probe.shape[1] - (1 if (self.has_cls and drop_cls) else 0)
        if cls_every:
            depth = len(self.blocks())
            if not self.has_cls or not 0 < cls_every <= depth:
                raise ValueError(f"model.vision.cls_every={cls_every} needs a tower with a CLS token and at most "
                                 f"{depth} blocks between picks ({type(model).__name__} has "
                                 f"{'a' if self.has_cls else 'no'} CLS token, {depth} blocks)")
            self.num_tokens = depth // cls_every

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]

    def _cls_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """LaVIN's visual tokens: the CLS token after every `cls_every`-th block ([B, depth // k, D])."""
        states = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return torch.stack([states[i][:, 0] for i in range(self.cls_every, len(states), self.cls_every)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.cls_every:
            return self._cls_tokens(pixel_values)
        feats = self._hidden(pixel_values)
        if self.has_cls and self.drop_cls:
            feats = feats[:, 1:]
        return feats

    def image_transform(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def feature_block(self) -> int:
        """The hidden state the features are (hidden state i = the output of block i; 0 = embeddings)."""
        depth = len(self.blocks())
        return depth if self.cls_every else self.feature_layer % (depth + 1)

    def bottom(self, pixel_values: torch.Tensor, start: int) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[start]

    def top(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        if self.cls_every:
            raise NotImplementedError("model.vision.cls_every picks CLS tokens from every few blocks: the tower "
                                      "cannot resume from a cached block input")
        for block in self.blocks()[start:self.feature_block()]:
            out = block(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.has_cls and self.drop_cls:
            hidden = hidden[:, 1:]
        return hidden

    def blocks(self) -> list[nn.Module]:
        depth = getattr(self.model.config, "num_hidden_layers", None)
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return list(module)
        raise ValueError(f"cannot find the {depth} transformer blocks of {type(self.model).__name__}")


def processor_input_size(processor) -> int | None:
    """The square side (px) of what `processor` hands the model, when it says so: the crop when it
    crops, else a fixed resize. A tower can run below its pretraining size (DINOv2: 224 px images
    on position embeddings for 518 px, interpolated)."""
    def side(sizes) -> int | None:  # a dict, or transformers' SizeDict
        height = sizes.get("height") if isinstance(sizes, dict) else getattr(sizes, "height", None)
        width = sizes.get("width") if isinstance(sizes, dict) else getattr(sizes, "width", None)
        return int(height) if height and height == width else None

    if getattr(processor, "do_center_crop", False):
        return side(getattr(processor, "crop_size", None))
    return side(getattr(processor, "size", None))


def _default_processor(config):
    """A CLIP-style processor sized for a tower built from a config (no processor files exist)."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = getattr(config, "image_size", 224)
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@register_vision_tower("hf")
def build_hf_tower(cfg: VisionConfig, attn_implementation: str) -> HFVisionTower:
    """Load (or build from `cfg.config`) a Hugging Face vision model and its image processor."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    if cfg.name_or_path and cfg.config:
        raise ValueError("model.vision: set either `name_or_path` or `config`, not both")
    # Towers use SDPA: flash-attn's varlen kernels bring nothing at vision sequence lengths.
    attn = "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation
    if cfg.name_or_path:
        model = AutoModel.from_pretrained(cfg.name_or_path, attn_implementation=attn)
        processor = AutoImageProcessor.from_pretrained(cfg.name_or_path)
    elif cfg.config:
        params = dict(cfg.config)
        model_type = params.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.vision.config needs a `model_type` (e.g. clip_vision_model)")
        model = AutoModel.from_config(AutoConfig.for_model(model_type, **params), attn_implementation=attn)
        processor = _default_processor(model.config)
    else:
        raise ValueError("model.vision: set `name_or_path` (HF name or folder) or `config` (a dict)")
    if hasattr(model, "vision_model") and hasattr(model.config, "vision_config"):
        model = model.vision_model  # a dual encoder (CLIP/SigLIP): keep the image side only
    if cfg.image_size is not None:
        resize_processor(processor, cfg.image_size)
    try:
        return HFVisionTower(model, processor, cfg.feature_layer, cfg.drop_cls, cfg.cls_every)
    except (RuntimeError, ValueError) as error:
        if cfg.image_size is None:
            raise
        raise ConfigError(f"model.vision.image_size={cfg.image_size}: {type(model).__name__} cannot run on "
                          f"{cfg.image_size} px images ({error}); use its own size (null) or a tower that "
                          f"interpolates its position embeddings (DINOv2)") from error


def resize_processor(processor, side: int) -> None:
    """Make `processor` hand the model `side` x `side` images: shorter side to `side`, centre crop."""
    if side < 1:
        raise ConfigError(f"model.vision.image_size={side} must be a positive number of pixels")
    processor.size = {"shortest_edge": side}
    processor.crop_size = {"height": side, "width": side}
    processor.do_center_crop = True
