"""Grafting's building blocks: begin/end-of-image embeddings, the translator as the only trainable
LLM part, vision-side narrowing of init sources, and mixed (image-text + text-only) training data."""

from __future__ import annotations

import json

import pytest
import torch

from mmtrain.config import ModelConfig, from_dict
from mmtrain.config.schema import InitSource, RunConfig
from mmtrain.models import build_vlm
from mmtrain.methods.grafting.graft import GraftError, check_compatible, graft_config, vision_side_sources
from tests.conftest import TINY_VISION


def model_config(tokenizer, llm_dir, **overrides) -> ModelConfig:
    raw = {
        "vision": {"config": dict(TINY_VISION)},
        "resampler": {"num_queries": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 4},
        "projector": {"kind": "mlp", "image_boundaries": True},
        "llm": {"name_or_path": str(llm_dir), "tokenizer": str(tokenizer)},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return from_dict(ModelConfig, raw)


@pytest.fixture(scope="module")
def surrogate_like(tmp_path_factory):
    """A 4-layer tiny Llama whose config marks layer 2 as a surrogate's translator."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.mmtrain_surrogate = {"cut": 2, "translator_layer": 2, "target_num_layers": 9}
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("surrogate_like")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_image_boundaries_wrap_every_image(tiny_assets, surrogate_like):
    plain, _, _ = build_vlm(model_config(tiny_assets["tokenizer"], surrogate_like, **{"projector.image_boundaries": False}))
    model, _, _ = build_vlm(model_config(tiny_assets["tokenizer"], surrogate_like))
    assert model.num_image_tokens == plain.num_image_tokens + 2
    pixels = torch.randn(3, 3, 32, 32)
    visual = model.encode_images(pixels)
    assert visual.shape == (3, model.num_image_tokens, 64)
    for i in range(3):
        assert torch.equal(visual[i, 0], model.projector.begin_image)
        assert torch.equal(visual[i, -1], model.projector.end_image)
    visual.sum().backward()
    assert model.projector.begin_image.grad is not None and model.projector.end_image.grad is not None
    names = {n for n, _ in model.projector.named_parameters(prefix="projector")}
    assert {"projector.begin_image", "projector.end_image", "projector.0.weight", "projector.2.weight"} <= names


def test_linear_projector_keeps_its_names_with_boundaries(tiny_assets, surrogate_like):
    model, _, _ = build_vlm(model_config(tiny_assets["tokenizer"], surrogate_like, **{"projector.kind": "linear"}))
    names = {n for n, _ in model.projector.named_parameters(prefix="projector")}
    assert names == {"projector.weight", "projector.bias", "projector.begin_image", "projector.end_image"}


def test_translator_is_the_only_trainable_llm_part(tiny_assets, surrogate_like):
    model, _, _ = build_vlm(model_config(tiny_assets["tokenizer"], surrogate_like, **{"llm.trainable": "adapters"}))
    trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    layer2 = [n for n, _ in model.llm.named_parameters() if n.startswith("model.model.layers.2.")]
    assert trainable == layer2 and len(layer2) > 0


def test_adapters_mode_on_a_plain_llm_fails(tiny_assets):
    with pytest.raises(ValueError, match="no adapter modules"):
        build_vlm(model_config(tiny_assets["tokenizer"], tiny_assets["llm"], **{"llm.trainable": "adapters"}))


def test_a_bad_translator_index_is_named(tiny_assets, surrogate_like, tmp_path):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(surrogate_like, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mmtrain_surrogate"]["translator_layer"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="translator layer 7 but the model has 4 layers"):
        build_vlm(model_config(tiny_assets["tokenizer"], folder))


def test_graft_narrows_init_sources_to_the_vision_side(tiny_assets, surrogate_like, tmp_path):
    sources = [
        InitSource(path="a", modules=[]),
        InitSource(path="b", modules=["resampler", "llm"]),
        InitSource(path="c", modules=["llm.model.model.layers.2"]),
        InitSource(path="d", modules=["vision.model.encoder.layers.1", "projector"], strict=False),
    ]
    narrowed = vision_side_sources(sources)
    assert [(s.path, s.modules, s.strict) for s in narrowed] == [
        ("a", ["vision", "resampler", "projector"], True), ("b", ["resampler"], True),
        ("d", ["vision.model.encoder.layers.1", "projector"], False)]
    cfg = RunConfig()
    cfg.model.llm.name_or_path = str(surrogate_like)
    cfg.model.llm.trainable = "adapters"
    cfg.init = sources
    grafted = graft_config(cfg, str(tiny_assets["llm"]))
    assert grafted.model.llm.name_or_path == str(tiny_assets["llm"]) and grafted.model.llm.trainable == "frozen"
    assert cfg.model.llm.name_or_path == str(surrogate_like) and len(cfg.init) == 4  # the original is untouched
    assert [s.path for s in grafted.init] == ["a", "b", "d"]


def test_graft_refuses_another_width(surrogate_like, tmp_path):
    other = tmp_path / "wide"
    other.mkdir()
    config = json.loads((surrogate_like / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    with pytest.raises(GraftError, match="hidden_size is 96 but the vision side was trained for .* with hidden_size 64"):
        check_compatible(str(surrogate_like), str(other))
    with pytest.raises(GraftError, match="does not exist"):
        check_compatible(str(surrogate_like), str(tmp_path / "missing"))


def test_training_data_can_mix_manifests(tiny_assets, surrogate_like, tmp_path):
    from mmtrain.config.schema import DataConfig
    from mmtrain.data import VLMDataset

    text_only = tmp_path / "text.jsonl"
    text_only.write_text("".join(json.dumps({"image": None, "conversations": [
        {"from": "human", "value": f"Count to {i}."}, {"from": "gpt", "value": " ".join(map(str, range(i)))}]}) + "\n"
        for i in range(1, 6)))
    model, tokenizer, _ = build_vlm(model_config(tiny_assets["tokenizer"], surrogate_like))
    images = VLMDataset.for_model(str(tiny_assets["train"]), model, tokenizer, DataConfig(max_length=64))
    mixed = VLMDataset.for_model([str(tiny_assets["train"]), str(text_only)], model, tokenizer, DataConfig(max_length=64))
    assert len(mixed) == len(images) + 5
    assert all(mixed[i]["has_image"] for i in range(len(images)))
    assert not any(mixed[len(images) + i]["has_image"] for i in range(5))
    subset = VLMDataset.for_model([str(tiny_assets["train"]), str(text_only)], model, tokenizer,
                                  DataConfig(max_length=64), subset=10, seed=1)
    assert len(subset) == 10


def test_boundary_embeddings_start_at_the_official_scale():
    from mmtrain.config.schema import ProjectorConfig
    from mmtrain.models.projector import build_projector

    torch.manual_seed(0)
    projector = build_projector(32, 4096, ProjectorConfig(kind="mlp", image_boundaries=True))
    # N(0, 1/d): the grafting code's init of its begin/end-of-image embeddings (d = 4096: std 1/64)
    for embedding in (projector.begin_image.detach(), projector.end_image.detach()):
        assert abs(float(embedding.std()) - 1 / 64) < 0.1 / 64 and abs(float(embedding.mean())) < 0.1 / 64
