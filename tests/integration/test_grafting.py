"""Surrogate grafting end to end on tiny models: build -> stage 1 (translator + adapter, mixed text)
-> stage 2 (translator frozen, top vision block) -> zero-shot graft onto the full target (one process
and two ZeRO-3 ranks under the real launcher) -> stage 3 on the target."""

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

from tests.conftest import REPO, launch, tiny_config

pytestmark = pytest.mark.slow
CUT = 2
TARGET_LAYERS = 5


@pytest.fixture(scope="module")
def grafting_run(tiny_assets, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmtrain.methods.grafting.build import build_surrogate

    root = tmp_path_factory.mktemp("grafting")
    torch.manual_seed(11)
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=TARGET_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "target", max_shard_size="200KB")
    build_surrogate(str(root / "target"), CUT, str(root / "surrogate"), max_shard_bytes=10**9)
    text_only = root / "text.jsonl"
    lines = [line.strip() for line in (tiny_assets["train"]).read_text().splitlines()[:16]]
    captions = [json.loads(line)["text"] for line in lines]
    text_only.write_text("".join(json.dumps({"image": None, "conversations": [
        {"from": "human", "value": "Say something."}, {"from": "gpt", "value": c}]}) + "\n" for c in captions))
    base = tiny_config(tiny_assets, root / "unused", **{
        "max_steps": 6, "log_every": 1, "eval_every": 0, "data.val": str(tiny_assets["val"]),
        "model.llm.name_or_path": str(root / "surrogate"), "model.projector.image_boundaries": True,
        "model.projector.kind": "mlp"})
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    evaluation = {"data": str(tiny_assets["val"]), "generate": 0, "max_samples": 12}
    recipe = {"name": "graft", "output_dir": str(root / "run"), "defaults": "base.yaml", "stages": [
        {"name": "stage1", "set": {"model.llm.trainable": "adapters",
                                   "data.train": [str(tiny_assets["train"]), str(text_only)]}},
        {"name": "stage2", "inherit": [{"from": "stage1", "modules": ["resampler", "projector", "llm"]}],
         "set": {"model.vision.trainable_top_k": 1},
         "evals": [{"name": "surrogate", **evaluation},
                   {"name": "grafted", "graft_llm": str(root / "target"), **evaluation}]},
        {"name": "stage3", "inherit": [{"from": "stage2", "modules": ["vision", "resampler", "projector"]}],
         "set": {"max_steps": 2, "model.llm.name_or_path": str(root / "target")}},
    ]}
    (root / "graft.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "run", str(root / "graft.yaml")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


def _trained(stage: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((stage / "checkpoints").glob("step_*"))[-1] / "trainable.safetensors"))


def _target_tensors(root: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(root / "target").state_dict().items()}


def test_stage1_trains_the_translator_alone_among_llm_parts(grafting_run):
    stage1 = _trained(grafting_run / "run" / "01-stage1")
    llm = sorted(n for n in stage1 if n.startswith("llm."))
    assert llm and all(n.startswith(f"llm.model.model.layers.{CUT}.") for n in llm)
    assert {"projector.begin_image", "projector.end_image"} <= set(stage1)
    target = _target_tensors(grafting_run)
    # The translator started as the target's layer K (the surrogate's build) and has moved.
    name = f"llm.model.model.layers.{CUT}.mlp.down_proj.weight"
    assert not torch.equal(stage1[name], target[f"model.layers.{CUT}.mlp.down_proj.weight"])


def test_stage2_keeps_the_translator_frozen_and_trains_the_top_vision_block(grafting_run):
    stage2 = _trained(grafting_run / "run" / "02-stage2")
    assert not any(n.startswith("llm.") for n in stage2)
    assert any(n.startswith("vision.") for n in stage2) and "projector.begin_image" in stage2


def _loaded(target: Path, graft_llm: str | None = None) -> dict[str, torch.Tensor]:
    from mmtrain.eval.loading import load_for_eval

    em = load_for_eval(target, graft_llm=graft_llm)
    return {k: v.detach().cpu().clone() for k, v in em.model.state_dict().items()}


def test_grafting_loads_exactly_the_trained_vision_side_and_nothing_of_the_surrogate(grafting_run):
    stage2 = grafting_run / "run" / "02-stage2"
    on_surrogate = _loaded(stage2)
    grafted = _loaded(stage2, str(grafting_run / "target"))
    trained = {**_trained(grafting_run / "run" / "01-stage1"), **_trained(stage2)}
    for name, tensor in grafted.items():
        if name.startswith(("vision.", "resampler.", "projector.")):
            assert torch.equal(tensor, on_surrogate[name]), name
            if name in trained:
                assert torch.equal(tensor, trained[name]), name
    target = _target_tensors(grafting_run)
    llm = {k.removeprefix("llm.model."): v for k, v in grafted.items() if k.startswith("llm.model.")}
    assert set(llm) >= {k for k in target if not k.startswith("lm_head")}
    for name, tensor in llm.items():
        assert torch.equal(tensor, target[name]), name  # the translator never reaches the target's layer K


def test_graft_evaluation_records_and_differs_from_the_surrogate_pair(grafting_run):
    evals = grafting_run / "run" / "02-stage2" / "eval"
    surrogate = json.loads((evals / "surrogate.json").read_text())
    grafted = json.loads((evals / "grafted.json").read_text())
    assert grafted["grafted"] is True and surrogate["grafted"] is False
    assert grafted["llm"] == str(grafting_run / "target")
    assert grafted["headline"]["loss"] != surrogate["headline"]["loss"]


def test_sharded_graft_evaluation_on_two_ranks_equals_one_process(grafting_run, tiny_assets):
    stage2 = grafting_run / "run" / "02-stage2"
    out = grafting_run / "zero3-grafted.json"
    launch(["-m", "mmtrain", "eval", str(stage2), "--data", str(tiny_assets["val"]), "--generate", "0",
            "--max-samples", "12", "--graft-llm", str(grafting_run / "target"),
            "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--out", str(out)], nprocs=2)
    sharded = json.loads(out.read_text())
    single = json.loads((stage2 / "eval" / "grafted.json").read_text())
    assert sharded["zero3"] is True and sharded["world_size"] == 2
    for key in ("loss", "loss_no_image", "loss_other_image"):
        assert sharded["loss"][key] == pytest.approx(single["loss"][key], rel=1e-5), key


def test_graft_evaluation_with_parameters_offloaded_equals_the_plain_one(grafting_run, tiny_assets):
    stage2 = grafting_run / "run" / "02-stage2"
    out = grafting_run / "offload-grafted.json"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(stage2), "--data", str(tiny_assets["val"]),
                           "--generate", "0", "--max-samples", "12", "--graft-llm", str(grafting_run / "target"),
                           "--deepspeed", str(REPO / "ds_configs" / "zero3_param_offload.json"), "--out", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    offloaded = json.loads(out.read_text())
    single = json.loads((stage2 / "eval" / "grafted.json").read_text())
    assert offloaded["zero3"] is True
    assert offloaded["loss"]["loss"] == pytest.approx(single["loss"]["loss"], rel=1e-6)


def test_stage3_fine_tunes_on_the_full_target(grafting_run):
    stage3 = grafting_run / "run" / "03-stage3"
    config = yaml.safe_load((stage3 / "config.yaml").read_text())
    assert config["model"]["llm"]["name_or_path"] == str(grafting_run / "target")
    assert (stage3 / "checkpoints" / "step_00000002" / "trainable.safetensors").is_file()


def test_graft_onto_an_llm_of_another_width_fails_clearly(grafting_run, tiny_assets):
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(grafting_run / "run" / "02-stage2"),
                           "--data", str(tiny_assets["val"]), "--graft-llm", str(tiny_assets["vision"])],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot graft onto" in proc.stderr
