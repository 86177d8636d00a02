"""The pre-submission cost estimate: FLOPs and GPU-hours arithmetic, per-GPU memory by ZeRO stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from torch import nn

from mmtrain.cost.estimate import GIB, estimate_pipeline, format_estimate, meta_model
from mmtrain.cost.flops import step_flops_model
from mmtrain.pipeline import load_recipe
from tests.conftest import REPO, tiny_config


def write_recipe(tmp_path: Path, defaults: dict | str, stages: list[dict]) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir(exist_ok=True)
    if isinstance(defaults, dict):
        (folder / "base.yaml").write_text(yaml.safe_dump(defaults))
        defaults = "base.yaml"
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "est", "output_dir": str(tmp_path / "runs"), "defaults": defaults,
                                    "stages": stages}, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_assets):
    """`tiny_recipe(**set)`: a one-stage recipe over the tiny assets with the stage's `set` overrides."""
    def make(**overrides):
        base = tiny_config(tiny_assets, tmp_path / "unused")
        return load_recipe(write_recipe(tmp_path, base, [{"name": "caption", "set": overrides}]))
    return make


def zero_json(name: str) -> str:
    return str(REPO / "ds_configs" / name)


def test_flops_are_steps_times_global_batch_times_the_step_model(tiny_recipe, tiny_assets):
    from mmtrain.data.manifest import read_manifest
    from mmtrain.data.templates import get_template
    from mmtrain.models.llm import load_tokenizer

    pipeline = tiny_recipe(max_steps=7, micro_batch_size=3, grad_accum_steps=2, gradient_checkpointing=True)
    result = estimate_pipeline(pipeline, gpus=4, gpu_type="h100")
    stage = result["stages"][0]
    cfg = pipeline.stages[0].config
    model = meta_model(cfg.model)

    # tokens per sample: the mean encoded length of the first 256 records, as the dataset encodes them
    tokenizer = load_tokenizer(cfg.model.llm)
    samples = read_manifest(tiny_assets["train"])[:256]
    lengths = [len(get_template("plain").encode(s, tokenizer, model.num_image_tokens)) for s in samples]
    assert stage["tokens_source"] == "manifest"
    assert stage["tokens_per_sample"] == pytest.approx(sum(lengths) / len(lengths))
    assert stage["tokens_per_sample"] > model.num_image_tokens
    assert stage["images_per_sample"] == 1.0

    assert stage["global_batch"] == 3 * 2 * 4 and stage["steps"] == 7
    step = step_flops_model(model, round(stage["tokens_per_sample"]), True)
    assert step.multipliers["llm"] == 3.0  # frozen LLM after a trainable VPG, recomputed forward
    expected = 7 * 24 * step.step(stage["tokens_per_sample"], 1.0)
    assert stage["flops"] == pytest.approx(expected, rel=1e-9)
    assert result["total"]["flops"] == pytest.approx(expected, rel=1e-9)


def test_gpu_hours_arithmetic_and_default_mfu(tiny_recipe):
    pipeline = tiny_recipe()
    stage = estimate_pipeline(pipeline, gpus=2, gpu_type="h100", mfu=0.25, peak_tflops=100)["stages"][0]
    assert stage["gpu_hours"] == pytest.approx(stage["flops"] / (100e12 * 0.25) / 3600)
    assert stage["hours_wall"] == pytest.approx(stage["gpu_hours"] / 2)

    result = estimate_pipeline(pipeline, gpus=2, gpu_type="H100")  # fp32: CUDA-core peak, MFU 0.5
    assert (result["gpu_type"], result["mfu"], result["peak_tflops"]) == ("h100", 0.5, 66.9)
    stage = result["stages"][0]
    assert stage["gpu_hours"] == pytest.approx(stage["flops"] / (66.9e12 * 0.5) / 3600)
    assert result["total"]["gpu_hours"] == pytest.approx(stage["gpu_hours"])
    text = format_estimate(result)
    assert "\ncaption " in text and "assumptions:" in text and "ZeRO" in text


def test_zero3_partitions_frozen_weights_zero2_replicates(tiny_recipe):
    def frozen(ds: str, gpus: int) -> float:
        result = estimate_pipeline(tiny_recipe(deepspeed=zero_json(ds)), gpus=gpus, gpu_type="a100")
        return result["stages"][0]["memory_per_gpu_gib"]["weights_frozen"]

    assert frozen("zero3.json", 4) == pytest.approx(frozen("zero3.json", 2) / 2)
    assert frozen("zero2.json", 4) == pytest.approx(frozen("zero2.json", 2))
    assert frozen("zero2.json", 2) == pytest.approx(2 * frozen("zero3.json", 2))


def test_optimizer_partitioning_and_offload(tiny_recipe):
    def stage(ds: str, **overrides) -> dict:
        return estimate_pipeline(tiny_recipe(deepspeed=zero_json(ds), **overrides), gpus=2,
                                 gpu_type="a100")["stages"][0]

    zero2, zero3 = stage("zero2.json"), stage("zero3.json")
    assert zero2["zero_stage"] == 2 and zero2["offload"] == "none" and zero2["cpu_memory_gib"] == 0
    memory = zero2["memory_per_gpu_gib"]
    # fp32 under ZeRO: master copy + 2 moments = 12 bytes per trainable parameter, partitioned like the gradients
    assert memory["optimizer"] == pytest.approx(3 * memory["gradients"])
    assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))

    offload = stage("zero3_offload.json")
    assert offload["offload"] == "optimizer" and offload["memory_per_gpu_gib"]["optimizer"] == 0
    # per node (2 GPUs): both ranks' optimizer partitions plus their fp32 gradient partitions
    moved = 2 * (zero3["memory_per_gpu_gib"]["optimizer"] + zero3["memory_per_gpu_gib"]["gradients"])
    assert offload["cpu_memory_gib"] == pytest.approx(moved)
    assert offload["memory_per_gpu_gib"]["total"] < zero3["memory_per_gpu_gib"]["total"]

    params = stage("zero3_param_offload.json")
    assert params["offload"] == "optimizer+param"
    assert params["memory_per_gpu_gib"]["weights_frozen"] == params["memory_per_gpu_gib"]["weights_trainable"] == 0
    assert params["cpu_memory_gib"] > offload["cpu_memory_gib"]

    eight_bit = stage("zero2.json", **{"optim.name": "adamw8bit"})["memory_per_gpu_gib"]
    assert eight_bit["optimizer"] == pytest.approx(memory["optimizer"] * (4 + 2) / 12)


def test_quantized_llm_weights(tiny_recipe):
    def frozen_bytes(quantization: str) -> float:
        pipeline = tiny_recipe(**{"model.llm.quantization": quantization})
        return estimate_pipeline(pipeline, 1, "a100")["stages"][0]["memory_per_gpu_gib"]["weights_frozen"] * GIB

    pipeline = tiny_recipe()
    model = meta_model(pipeline.stages[0].config.model)
    linear = sum(m.weight.numel() for name, m in model.llm.model.named_modules()
                 if isinstance(m, nn.Linear) and not name.endswith("lm_head"))
    full = frozen_bytes("none")  # fp32: 4 bytes a weight
    assert frozen_bytes("4bit") == pytest.approx(full - linear * 4 + linear * 4 / 8)
    assert frozen_bytes("8bit") == pytest.approx(full - linear * 4 + linear * 4 / 4)


def test_unknown_gpu_type_needs_a_peak(tiny_recipe):
    pipeline = tiny_recipe()
    with pytest.raises(ValueError, match=r"known types: .*h100.*--peak-tflops"):
        estimate_pipeline(pipeline, 1, "tpu-v9")
    result = estimate_pipeline(pipeline, 1, "tpu-v9", peak_tflops=50)
    assert result["stages"][0]["fits"] is None and result["peak_tflops"] == 50
    with pytest.raises(ValueError, match="multiple of nodes"):
        estimate_pipeline(pipeline, 3, "h100", nodes=2)


def test_without_tokenizer_or_manifest(tiny_recipe, tmp_path):
    exact = estimate_pipeline(tiny_recipe(), 1, "h100")["stages"][0]["tokens_per_sample"]
    approx = estimate_pipeline(tiny_recipe(**{"model.llm.tokenizer": str(tmp_path / "missing")}), 1,
                               "h100")["stages"][0]
    assert approx["tokens_source"] == "manifest-approx"
    assert exact / 2 < approx["tokens_per_sample"] < exact * 2
    result = estimate_pipeline(tiny_recipe(**{"data.train": str(tmp_path / "missing.jsonl")}), 1, "h100")
    stage = result["stages"][0]
    assert (stage["tokens_source"], stage["tokens_per_sample"], stage["images_per_sample"]) == ("max_length", 64, 1.0)
    assert any("unreadable" in line for line in result["assumptions"])


def test_mixture_weights_manifests_by_size(tiny_recipe, tiny_assets, tmp_path):
    import json

    text_only = tmp_path / "text.jsonl"
    turns = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]
    text_only.write_text("".join(json.dumps({"conversations": turns}) + "\n" for _ in range(300)))
    images = sum(1 for line in Path(tiny_assets["train"]).read_text().splitlines() if line.strip())
    pipeline = tiny_recipe(**{"data.train": [str(tiny_assets["train"]), str(text_only)]})
    stage = estimate_pipeline(pipeline, 1, "h100")["stages"][0]
    assert stage["images_per_sample"] == pytest.approx(images / (images + 300))


def test_llama_7b_numbers_are_plausible(tmp_path):
    """LaVIN-7B (configs/params/lavin-7b.yaml: config dicts only, no weights) in bf16 on 8 x H100."""
    recipe = write_recipe(tmp_path, str(REPO / "configs" / "params" / "lavin-7b.yaml"), [
        {"name": "zero2", "set": {"precision": "bf16", "max_steps": 1000, "micro_batch_size": 4,
                                  "data.max_length": 512}},
        {"name": "zero3", "set": {"precision": "bf16", "max_steps": 1000, "micro_batch_size": 4,
                                  "data.max_length": 512, "deepspeed": zero_json("zero3.json")}},
        {"name": "big", "set": {"precision": "bf16", "micro_batch_size": 64, "data.max_length": 512}},
        {"name": "big_ckpt", "set": {"precision": "bf16", "micro_batch_size": 64, "data.max_length": 512,
                                     "gradient_checkpointing": True}},
    ])
    result = estimate_pipeline(load_recipe(recipe), gpus=8, gpu_type="h100")
    zero2, zero3, big, big_ckpt = result["stages"]
    # 64 x 512 tokens through 32 LLM layers keep ~136 GiB of activations; recomputing them keeps ~12 GiB
    # (their inputs + one layer); the adapter-trained ViT (~13 GiB) and the loss's logits (~8 GiB) remain
    assert big["fits"] is False and big["memory_per_gpu_gib"]["activations"] > 150
    assert big_ckpt["fits"] is True and 25 < big_ckpt["memory_per_gpu_gib"]["activations"] < 40
    assert big_ckpt["flops"] > big["flops"]  # the recomputed forward
    # LLaMA-7B: 6.74B frozen weights = 12.55 GiB in bf16, + CLIP ViT-L/14 0.30B = 0.57 GiB, replicated
    assert zero2["memory_per_gpu_gib"]["weights_frozen"] == pytest.approx(13.12, abs=0.05)
    assert zero3["memory_per_gpu_gib"]["weights_frozen"] == pytest.approx(13.12 / 8, abs=0.01)
    assert zero2["fits"] and 15 < zero2["memory_per_gpu_gib"]["total"] < 40
    # a frozen LLM costs forward + backward to its inputs: about 4 FLOPs per parameter per token
    tokens = 1000 * 32 * 512
    assert 4 * 6.7e9 * tokens < zero2["flops"] < 4 * 7.2e9 * tokens
    assert zero2["gpu_hours"] == pytest.approx(zero2["flops"] / (989.4e12 * 0.35) / 3600)
    assert 0.3 < zero2["gpu_hours"] < 0.45


def test_encoder_decoder_lm_is_counted_on_a_cpu_copy(tiny_recipe):
    """The encoder-decoder wrapper packs its inputs by the mask's values: the meta device cannot run it."""
    t5 = {"model_type": "t5", "vocab_size": 512, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
          "num_heads": 4, "decoder_start_token_id": 0}
    pipeline = tiny_recipe(**{"model.llm": {"config": t5, "name_or_path": None}})
    result = estimate_pipeline(pipeline, 1, "h100")
    stage = result["stages"][0]
    assert stage["flops"] > 0 and stage["tokens_source"] == "manifest"
    assert any("CPU copy" in line for line in result["assumptions"])
