"""DINOv2 as a vision tower (`model.vision: {kind: hf}`): the input size comes from the image processor
(the model interpolates its position embeddings), and the tower options work on it: CLS dropping,
`feature_layer`, `trainable_top_k` and MMA adapters before each block's `norm1`. Tiny random weights;
the real pretrained asset is tested in tests/integration/test_dinov2_real.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmtrain.assets.dinov2 import image_processor
from mmtrain.config.errors import ConfigError
from mmtrain.config.schema import ModelConfig, VisionConfig
from mmtrain.methods.mma.config import AdapterConfig
from mmtrain.methods.mma.method import attach_vision_adapters
from mmtrain.models.trainability import apply_trainability
from mmtrain.models.vision import build_vision_tower


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, patch_size=14,
                          image_size=70, layer_norm_eps=1e-6, layerscale_value=1.0)
    Dinov2Model(config).save_pretrained(folder)
    processor = image_processor()
    processor.size = {"height": 42, "width": 42}
    processor.save_pretrained(folder)
    return folder


def test_input_size_comes_from_the_processor(tiny_dinov2):
    tower = build_vision_tower(VisionConfig(name_or_path=str(tiny_dinov2)), "sdpa")
    assert tower.image_shape == (3, 42, 42)  # not the config's 70 px: 3 x 3 patches
    assert tower.num_tokens == 9 and tower.out_dim == 32 and len(tower.blocks()) == 3
    pixels = tower.image_transform(Image.new("RGB", (100, 60), (200, 40, 10)))
    assert pixels.shape == (3, 42, 42)
    assert tower(pixels[None]).shape == (1, 9, 32)
    with_cls = build_vision_tower(VisionConfig(name_or_path=str(tiny_dinov2), drop_cls=False, feature_layer=-2),
                                  "sdpa")
    assert with_cls.num_tokens == 10
    states = with_cls.model(pixel_values=pixels[None], output_hidden_states=True).hidden_states
    assert torch.equal(with_cls(pixels[None]), states[-2])


def test_mma_adapters_and_top_blocks_train(tiny_dinov2):
    tower = build_vision_tower(VisionConfig(name_or_path=str(tiny_dinov2)), "sdpa").eval()
    pixels = torch.rand(2, 3, 42, 42)
    before = tower(pixels)
    attached = attach_vision_adapters(tower, AdapterConfig(dropout=0.0))
    assert len(attached.adapters()) == 3
    assert torch.allclose(tower(pixels), before, atol=1e-6)  # zero-initialised up-projections

    model = torch.nn.Module()
    model.vision = build_vision_tower(VisionConfig(name_or_path=str(tiny_dinov2)), "sdpa")
    for name in ("resampler", "projector", "llm"):
        setattr(model, name, torch.nn.Linear(2, 2))
    cfg = ModelConfig(vision=VisionConfig(trainable="frozen", trainable_top_k=1))
    apply_trainability(model, cfg)
    trained = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.encoder.layer.2.") for n in trained)


def test_image_size_overrides_the_processor(tiny_dinov2):
    tower = build_vision_tower(VisionConfig(name_or_path=str(tiny_dinov2), image_size=56), "sdpa")
    assert tower.image_shape == (3, 56, 56) and tower.num_tokens == 16  # 4 x 4 patches, CLS dropped
    pixels = tower.image_transform(Image.new("RGB", (64, 48), (0, 90, 200)))
    assert pixels.shape == (3, 56, 56)
    assert tower(pixels[None]).shape == (1, 16, 32)
    lavin = build_vision_tower(VisionConfig(name_or_path=str(tiny_dinov2), image_size=56, cls_every=1), "sdpa")
    assert lavin(pixels[None]).shape == (1, 3, 32)  # the CLS token after each of the 3 blocks


def test_image_size_on_a_tower_that_cannot_resize_names_the_key(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path)
    image_processor().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.vision\.image_size=48: CLIPVisionModel cannot run on 48 px"):
        build_vision_tower(VisionConfig(name_or_path=str(tmp_path), image_size=48), "sdpa")


def test_counting_on_meta_runs_the_tower_at_the_processor_size(tiny_dinov2):
    """`mmtrain count` and the benchmarks build the model from config files only: the tower must still
    run at its processor's 42 px (3 x 3 tokens), not its config's 70 px, or token-dependent parts
    (a spatial merge, the token count) differ from the trained model's."""
    from mmtrain.models.counting import config_only

    cfg = ModelConfig(vision=VisionConfig(name_or_path=str(tiny_dinov2)))
    with torch.device("meta"):
        tower = build_vision_tower(config_only(cfg).vision, "sdpa")
    assert tower.image_shape == (3, 42, 42) and tower.num_tokens == 9
    resized = ModelConfig(vision=VisionConfig(name_or_path=str(tiny_dinov2), image_size=56))
    assert config_only(resized).vision.image_size == 56


@pytest.mark.parametrize(("feature_layer", "drop_cls"), [(-1, True), (-2, False), (2, True)])
def test_a_split_forward_gives_the_towers_features(tiny_dinov2, feature_layer, drop_cls):
    """What a feature cache keeps for `trainable_top_k` (a block's input) resumes to the same features."""
    tower = build_vision_tower(VisionConfig(name_or_path=str(tiny_dinov2), feature_layer=feature_layer,
                                            drop_cls=drop_cls), "sdpa").eval()
    pixels = torch.rand(2, 3, 42, 42)
    with torch.no_grad():
        whole = tower(pixels)
        for start in range(tower.feature_block() + 1):
            hidden = tower.bottom(pixels, start)
            assert hidden.shape == (2, 10, 32)
            torch.testing.assert_close(tower.top(hidden, start), whole, rtol=0, atol=1e-6)
