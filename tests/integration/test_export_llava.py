"""`mmtrain export`: a LLaVA-shaped run loads in transformers' LlavaForConditionalGeneration and computes
the same logits as mmtrain's model; a model that does not map is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, launch, tiny_config, write_config

pytestmark = pytest.mark.slow
LLAVA_SHAPED = {"model.resampler": {"kind": "identity"}, "model.projector.kind": "mlp", "model.vision.feature_layer": -2,
                "model.vision.drop_cls": True, "max_steps": 2, "checkpoint.save_every": 0}


@pytest.fixture(scope="module")
def llava_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava_run")
    path = write_config(tiny_config(tiny_assets, out / "run", **LLAVA_SHAPED), out / "config.yaml")
    launch(["-m", "mmtrain.train", str(path)], nprocs=1)
    return out / "run"


def export_and_compare_logits(run, out):
    """Export `run`, load it in transformers, and check its logits on 3 training samples equal mmtrain's."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from mmtrain.data import VLMDataset, collate
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.export.writer import export_llava

    loaded = load_for_eval(run)
    model, cfg = loaded.model, loaded.cfg
    folder = export_llava(model, cfg, AutoTokenizer.from_pretrained(cfg.model.llm.tokenizer), out)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    dataset = VLMDataset.for_model(cfg.data.train, model, loaded.tokenizer, cfg.data)
    batch = collate([dataset[i] for i in range(3)], loaded.tokenizer.pad_token_id)
    batch.pop("labels")  # full logits
    with torch.no_grad():
        ours = model(**batch).logits
        ids = batch["input_ids"].clone()
        ids[batch["image_mask"]] = hf.config.image_token_index
        theirs = hf(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[..., : ours.shape[-1]][keep], ours[keep], rtol=1e-4, atol=1e-4)
    return loaded, hf


def test_exported_llava_gives_mmtrains_logits(llava_run, tmp_path):
    export_and_compare_logits(llava_run, tmp_path / "export")


def test_a_qformer_run_is_refused_by_name(tiny_assets, tmp_path):
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.export.llava import NotMappableError
    from mmtrain.export.writer import export_llava

    path = write_config(tiny_config(tiny_assets, tmp_path / "run", max_steps=1, **{"checkpoint.save_every": 0}),
                        tmp_path / "config.yaml")
    launch(["-m", "mmtrain.train", str(path)], nprocs=1)
    loaded = load_for_eval(tmp_path / "run")
    with pytest.raises(NotMappableError, match=r"model.resampler is kind 'qformer'.*kind: identity"):
        export_llava(loaded.model, loaded.cfg, loaded.tokenizer, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_command_writes_a_loadable_folder_with_a_model_card(llava_run, tmp_path):
    from transformers import AutoProcessor

    out = tmp_path / "exported"
    command = [sys.executable, "-m", "mmtrain", "export", str(llava_run), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "GPU-hours allocated" in card and "step 2" in card and "projector" in card
    processor = AutoProcessor.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"]
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_processor_prompt_and_greedy_text_match_mmtrain(llava_run, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from mmtrain.data import VLMDataset, load_image
    from mmtrain.data.templates import stop_token_ids
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.eval.scoring import _left_pad, _prompt_only
    from mmtrain.export.writer import export_llava

    loaded = load_for_eval(llava_run)
    model, cfg, tokenizer = loaded.model, loaded.cfg, loaded.tokenizer
    folder = export_llava(model, cfg, AutoTokenizer.from_pretrained(cfg.model.llm.tokenizer), tmp_path / "export")
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    dataset = VLMDataset.for_model(cfg.data.train, model, tokenizer, cfg.data)
    for index in range(3):
        prompt = _prompt_only(dataset.load(index))
        expected = prompt["input_ids"].clone()
        expected[prompt["image_mask"]] = hf.config.image_token_index
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                             add_generation_prompt=True)
        inputs = processor(images=load_image(dataset.samples[index].image), text=text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == expected.tolist()
        with torch.no_grad():
            ours = model.generate(**_left_pad([prompt], tokenizer.pad_token_id), max_new_tokens=8,
                                  eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)[0]
            theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert processor.decode(theirs, skip_special_tokens=True) == tokenizer.decode(ours, skip_special_tokens=True)
        assert theirs.tolist() == ours[: len(theirs)].tolist()


@pytest.mark.parametrize("prompt", [None, "what colour is the square?"], ids=["caption", "question"])
def test_generate_gives_the_same_answers_from_the_run_and_from_its_export(llava_run, tmp_path, prompt):
    from mmtrain.config import load_config

    train = load_config(llava_run / "config.yaml").data.train
    folder = (tmp_path / "export")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "mmtrain", "export", str(llava_run), "--out", str(folder)], cwd=REPO,
                   env=env, check=True, capture_output=True)
    answers = {}
    for name, target in (("run", llava_run), ("export", folder)):
        out = tmp_path / f"{name}.jsonl"
        command = [sys.executable, "-m", "mmtrain", "generate", str(target), "--image", str(train), "--out", str(out),
                   "--max-new-tokens", "6"] + (["--prompt", prompt] if prompt else [])
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers["run"]) > 8 and sum(bool(r["answer"]) for r in answers["run"]) > len(answers["run"]) // 2
    assert answers["export"] == answers["run"]


def test_lora_is_merged_into_the_exported_llm(tiny_assets, tmp_path):
    lora = {"model.llm.trainable": "adapters", "model.llm.lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                                   "target_modules": ["q_proj", "v_proj"]},
            "optim.lr": 0.05}
    path = write_config(tiny_config(tiny_assets, tmp_path / "run", **LLAVA_SHAPED, **lora), tmp_path / "config.yaml")
    launch(["-m", "mmtrain.train", str(path)], nprocs=1)
    loaded, hf = export_and_compare_logits(tmp_path / "run", tmp_path / "export")
    lora_b = [p for n, p in loaded.model.llm.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained: the merge changes the weights
    assert not any("lora" in name for name, _ in hf.named_parameters())


def test_a_4bit_llm_is_exported_from_its_full_precision_weights(tiny_assets, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmtrain.eval.loading import load_for_eval
    from mmtrain.export.writer import export_llava

    quantised = {"model.llm.trainable": "adapters", "model.llm.quantization": "4bit",
                 "model.llm.lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}}
    path = write_config(tiny_config(tiny_assets, tmp_path / "run", **LLAVA_SHAPED, **quantised), tmp_path / "config.yaml")
    launch(["-m", "mmtrain.train", str(path)], nprocs=1)
    loaded = load_for_eval(tmp_path / "run")
    folder = export_llava(loaded.model, loaded.cfg, AutoTokenizer.from_pretrained(loaded.cfg.model.llm.tokenizer),
                          tmp_path / "export")
    exported = load_file(str(folder / "model.safetensors"))
    original = AutoModelForCausalLM.from_pretrained(tiny_assets["llm"], dtype=torch.float32).state_dict()
    # Frozen weights are the original full-precision ones, not 4-bit round trips; LoRA targets moved.
    name = "layers.0.mlp.down_proj.weight"
    assert exported[f"model.language_model.{name}"].dtype == torch.float32
    assert torch.equal(exported[f"model.language_model.{name}"], original[f"model.{name}"])
    q_name = "layers.0.self_attn.q_proj.weight"
    assert exported[f"model.language_model.{q_name}"].shape == original[f"model.{q_name}"].shape
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())["text_config"]
