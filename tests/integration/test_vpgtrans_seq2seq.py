"""VPGTrans onto an encoder-decoder target (the paper's FlanT5 path), end to end on tiny models.

The source VPG trains with a tiny decoder-only Llama; the target is a tiny random T5 with its own,
smaller tokenizer, so the word converter bridges two vocabularies (texts tokenised to equal lengths,
paired position by position). The converted projector feeds T5's encoder; warm-up and fine-tune
train, and the result evaluates with generation. No T5 weights exist offline: random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.slow
HARNESS = str(REPO / "tests" / "launch" / "train_and_dump.py")
TINY_T5 = dict(vocab_size=320, d_model=48, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=12,
               dropout_rate=0.0, pad_token_id=2, eos_token_id=1, decoder_start_token_id=2)


@pytest.fixture(scope="module")
def t5_target(tiny_assets, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from mmtrain.data.synthetic import make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("t5_target")
    texts = (tiny_assets["root"] / "data" / "train.jsonl").read_text().splitlines()
    make_tiny_tokenizer(texts, folder, vocab_size=TINY_T5["vocab_size"])
    torch.manual_seed(11)
    AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", **TINY_T5)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seq2seq_run(tiny_assets, t5_target, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vpgtrans_t5")
    base = tiny_config(tiny_assets, root / "unused", **{
        "data.val": str(tiny_assets["val"]), "eval_every": 8, "max_steps": 8, "log_every": 1,
        "data.train_samples": 32, "model.llm.name_or_path": str(t5_target), "model.llm.tokenizer": str(t5_target)})
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    recipe = {"name": "vt-t5", "output_dir": str(root / "vt"), "defaults": "base.yaml", "stages": [
        {"name": "source", "set": {"model.llm.name_or_path": str(tiny_assets["llm"]),
                                   "model.llm.tokenizer": str(tiny_assets["tokenizer"])}},
        {"name": "warmup",
         "inherit": [{"from": "source", "modules": ["resampler", "projector"],
                      "word_converter": {"batch_size": 8, "epochs": 8, "holdout": 0.1}}],
         "set": {"max_steps": 8, "model.resampler.trainable": "frozen",
                 "optim": {"schedule": "constant", "warmup_steps": 0, "lr_multipliers": {"projector": 5.0}}}},
        {"name": "finetune", "inherit": [{"from": "warmup", "modules": ["resampler", "projector"]}],
         "set": {"max_steps": 8},
         "evals": [{"name": "val", "data": str(tiny_assets["val"]), "max_samples": 6, "generate": 3}]},
    ]}
    (root / "vt.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "run", str(root / "vt.yaml")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


def test_converter_bridges_two_vocabularies_into_t5(seq2seq_run):
    report = json.loads((seq2seq_run / "vt" / "02-warmup" / "word_converter.json").read_text())
    assert not report["same_tokenizer"]
    assert 0 < report["texts_kept"] <= report["texts_total"] and report["pairs_heldout"] > 0
    assert report["heldout_cosine"] > report["heldout_cosine_initial"] + 0.1


def test_t5_warmup_starts_from_the_merged_projector(seq2seq_run):
    from mmtrain.methods.vpgtrans.converter import load_converter
    from mmtrain.methods.vpgtrans.merge import merge_projector

    root = seq2seq_run
    warmup = root / "vt" / "02-warmup"
    proc = subprocess.run([sys.executable, HARNESS, str(warmup / "stage_config.yaml"), "--set",
                           f"output_dir={root / 'replay'}", "max_steps=1", "eval_every=0", "checkpoint.resume=never"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    initial = load_file(str(root / "replay" / "dump" / "initial.safetensors"))
    source = load_file(str(root / "vt" / "01-source" / "checkpoints" / "step_00000008" / "trainable.safetensors"))
    weight, bias, _ = load_converter(warmup / "word_converter.safetensors")
    merged_w, merged_b = merge_projector(source["projector.weight"], source["projector.bias"], weight, bias)
    assert initial["projector.weight"].shape == (TINY_T5["d_model"], source["projector.weight"].shape[1])
    assert torch.allclose(initial["projector.weight"], merged_w, atol=1e-6)
    assert torch.allclose(initial["projector.bias"], merged_b, atol=1e-6)
    for name, tensor in initial.items():
        if name.startswith("resampler."):
            assert torch.equal(tensor, source[name]), name


def test_t5_stages_train_and_evaluate_with_generation(seq2seq_run):
    root = seq2seq_run / "vt"
    for stage in ("02-warmup", "03-finetune"):
        losses = [json.loads(line)["loss"] for line in (root / stage / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert len(losses) == 8 and all(loss > 0 for loss in losses)
    warm = [json.loads(line)["loss"] for line in (root / "02-warmup" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
    assert sum(warm[-3:]) < sum(warm[:3]), warm  # the projector alone learns against the frozen T5
    result = json.loads((root / "03-finetune" / "eval" / "val.json").read_text())
    assert result["loss"]["loss"] > 0 and len(result["captions"]["examples"]) == 3
