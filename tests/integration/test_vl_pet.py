"""VL-PET on an encoder-decoder LM inside the VLM, end to end: two ZeRO-3 ranks under the real
launcher train only the VL-PET modules, the encoder LayerNorms and the VPG; the checkpoint then
evaluates (loss, greedy captions) in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, launch, tiny_config, write_config

pytestmark = pytest.mark.slow
HARNESS = str(REPO / "tests" / "launch" / "train_and_dump.py")
TINY_BART = dict(model_type="bart", vocab_size=512, d_model=32, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 max_position_embeddings=128, pad_token_id=2, bos_token_id=0, eos_token_id=1,
                 decoder_start_token_id=1, forced_eos_token_id=None)


@pytest.fixture(scope="module")
def vl_pet_run(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("vl_pet")
    cfg = tiny_config(tiny_assets, root / "run", **{
        "deepspeed": str(REPO / "ds_configs" / "zero3.json"), "max_steps": 8, "log_every": 1, "optim.lr": 1e-2,
        "model.llm": {"config": TINY_BART, "tokenizer": str(tiny_assets["tokenizer"]), "trainable": "adapters",
                      "vl_pet": {"gate": "large", "rank": 8, "heads": 2, "gate_rank": 8}}})
    launch([HARNESS, str(write_config(cfg, root / "config.yaml"))], nprocs=2)
    return root / "run"


def test_only_vl_pet_modules_norms_and_vpg_train(vl_pet_run):
    initial = load_file(str(vl_pet_run / "dump" / "initial.safetensors"))
    final = load_file(str(vl_pet_run / "dump" / "final.safetensors"))
    changed = {n for n in final if not torch.equal(initial[n], final[n])}
    llm_changed = {n for n in changed if n.startswith("llm.")}
    assert any(".vl_pet_attn." in n for n in llm_changed) and any(".vl_pet_ffn." in n for n in llm_changed)
    assert any(".encoder_attn.vl_pet_value." in n for n in llm_changed)
    assert any("layer_norm" in n and ".encoder." in n for n in llm_changed)
    assert all(".vl_pet_" in n or (".encoder." in n and "layer" in n and "norm" in n) for n in llm_changed), \
        sorted(llm_changed)
    assert not any(".decoder." in n and ".vl_pet_" not in n for n in llm_changed)
    assert "projector.weight" in changed
    losses = [json.loads(line)["loss"] for line in (vl_pet_run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_vl_pet_checkpoint_evaluates_with_generation(vl_pet_run, tiny_assets):
    out = vl_pet_run / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(vl_pet_run), "--data", str(tiny_assets["val"]),
                           "--max-samples", "6", "--generate", "3", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["loss"]["loss"] > 0 and len(result["captions"]["examples"]) == 3
