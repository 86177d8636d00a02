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


def test_exported_llava_gives_mmtrains_logits(llava_run, tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from mmtrain.data import VLMDataset, collate
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.export.writer import export_llava

    loaded = load_for_eval(llava_run)
    model, cfg = loaded.model, loaded.cfg
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.llm.tokenizer)
    folder = export_llava(model, cfg, tokenizer, tmp_path / "export")
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
