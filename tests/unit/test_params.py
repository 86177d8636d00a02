"""`mmtrain params`: parameter counts on the meta device, LaVIN's published budgets."""

from __future__ import annotations

import json

import pytest
import torch

from mmtrain.config import load_config
from mmtrain.models.counting import build_on_meta, count_parameters, main
from tests.conftest import REPO, tiny_config, write_config


def total(result: dict) -> dict:
    return next(r for r in result["components"] if r["component"] == "total")


def test_lavin_7b_budget_is_3_78m():
    result = count_parameters(load_config(REPO / "configs" / "params" / "lavin-7b.yaml").model)
    # 32 LLaMA blocks and 24 ViT-L blocks x (A: 8d+8, B and D: 5d each, router 2d+2), the modality
    # token (2 x 4096) and the visual MLP 1024 -> 128 -> 4096.
    assert total(result)["trainable"] == 32 * (20 * 4096 + 10) + 24 * (20 * 1024 + 10) + 2 * 4096 + (
        1024 * 128 + 128 + 128 * 4096 + 4096) == 3_781_296
    rows = {r["component"]: r for r in result["components"]}
    assert rows["llm"]["frozen"] == 6_738_415_616  # LLaMA-7B
    assert rows["vision"]["frozen"] == 303_179_776  # CLIP ViT-L/14 (the image tower)
    assert result["trainable_by_kind"]["modality token"] == 8192


def test_lavin_13b_budget_is_5_4m():
    result = count_parameters(load_config(REPO / "configs" / "params" / "lavin-13b.yaml").model)
    assert total(result)["trainable"] == 5_390_080
    assert round(total(result)["trainable"] / 1e6, 1) == 5.4


def test_counting_allocates_nothing():
    model = build_on_meta(load_config(REPO / "configs" / "params" / "lavin-13b.yaml").model)
    assert all(p.device == torch.device("meta") for p in model.parameters())


def test_counts_of_a_pretrained_config_match_the_built_model(tiny_assets, tmp_path):
    from mmtrain.models import build_vlm, parameter_table

    cfg = load_config(write_config(tiny_config(tiny_assets, tmp_path / "run", **{
        "model.llm.adapter": {"kind": "router"}, "model.llm.trainable": "adapters"}), tmp_path / "c.yaml"))
    assert count_parameters(cfg.model)["components"] == parameter_table(build_vlm(cfg.model)[0])


def test_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "counts.json"
    assert main([str(REPO / "configs" / "params" / "lavin-7b.yaml"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3,781,296" in printed and "MMA routers" in printed
    assert total(json.loads(out.read_text()))["trainable"] == 3_781_296


def test_cli_names_a_wrong_key(tmp_path, capsys):
    assert main([str(REPO / "configs" / "params" / "lavin-7b.yaml"), "--set", "model.llm.adaptor.kind=plain"]) == 2
    assert "adaptor" in capsys.readouterr().err


@pytest.mark.parametrize("kind, expected", [("plain", 32 * (8 * 4096 + 8 + 4 * 4096 + 4096))])
def test_plain_adapter_ablation_budget(kind, expected):
    cfg = load_config(REPO / "configs" / "params" / "lavin-7b.yaml", [f"model.llm.adapter.kind={kind}"])
    assert count_parameters(cfg.model)["trainable_by_kind"]["MMA adapters"] - 24 * (20 * 1024 + 10 - 2 * 1024 - 2) \
        == expected


def test_vl_pet_bart_base_budget_and_the_papers_accounting():
    result = count_parameters(load_config(REPO / "configs" / "params" / "vl-pet-bart-base.yaml").model)
    kinds = result["trainable_by_kind"]
    # 12 encoder modules (multi-head down 768 -> 96 in 4 heads, up 96 -> 768, large gate of rank 96),
    # 6 value adapters (768 -> 96 -> 768) and the encoder's 13 LayerNorms.
    module = (768 * 96 + 96) + (96 * 768 + 768) + (768 * 96 + 96) + (96 * 768 + 768)
    assert kinds["VL-PET modules"] == 12 * module == 3_559_680
    assert kinds["VL-PET value adapters"] == 6 * ((768 * 96 + 96) + (96 * 768 + 768)) == 889_920
    assert kinds["LayerNorms"] == 13 * 2 * 768
    llm = next(r for r in result["components"] if r["component"] == "llm")
    assert llm["trainable"] == 4_469_568 and llm["frozen"] == 139_420_416 - 19_968
    # The paper's 4.16%: the same modules plus Linear(2048, 768) + LayerNorm over precomputed
    # CLIP-ResNet50 features, over every parameter but the vision backbone.
    paper_projection = 2048 * 768 + 768 + 2 * 768
    share = (llm["trainable"] + paper_projection) / (llm["total"] + paper_projection)
    assert round(100 * share, 2) == 4.16


def test_vl_pet_t5_base_budget():
    result = count_parameters(load_config(REPO / "configs" / "params" / "vl-pet-t5-base.yaml").model)
    llm = next(r for r in result["components"] if r["component"] == "llm")
    modules = 12 * 2 * 2 * (768 * 192 + 192 + 192 * 768 + 768)  # encoder: adapter + large gate, r = 192
    values = 12 * (768 * 96 + 96 + 96 * 768 + 768)  # decoder value adapters, r = 96
    assert llm["trainable"] == modules + values + 19_200 == 16_000_896
    assert llm["total"] - llm["trainable"] == 222_903_552 - 19_200


def test_vl_pet_value_rank_sizes_the_value_adapters_alone():
    path = REPO / "configs" / "params" / "vl-pet-t5-base.yaml"
    default = count_parameters(load_config(path).model)["trainable_by_kind"]
    wider = count_parameters(load_config(path, ["model.llm.vl_pet.value_rank=192"]).model)["trainable_by_kind"]
    assert wider["VL-PET modules"] == default["VL-PET modules"]
    # 12 decoder layers x (768 -> r -> 768 with biases)
    assert default["VL-PET value adapters"] == 12 * (768 * 96 + 96 + 96 * 768 + 768)
    assert wider["VL-PET value adapters"] == 12 * (768 * 192 + 192 + 192 * 768 + 768)
