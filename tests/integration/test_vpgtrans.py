"""VPGTrans end to end on tiny models: source VPG -> word converter + merge -> projector warm-up -> speed-up.

The source LLM (width 64) and the target (width 96) share the tiny tokenizer, like Qwen2.5-Coder
0.5B and 1.5B. Real DeepSpeed engines throughout; the ZeRO-3 case runs two ranks under the launcher.
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

from tests.conftest import REPO, TINY_LLM, launch, tiny_config

pytestmark = pytest.mark.slow
HARNESS = str(REPO / "tests" / "launch" / "train_and_dump.py")


@pytest.fixture(scope="module")
def target_llm(tiny_assets, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {**TINY_LLM, "hidden_size": 96, "intermediate_size": 192}
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    folder = tmp_path_factory.mktemp("target_llm")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vpgtrans_run(tiny_assets, target_llm, tmp_path_factory) -> Path:
    """`mmtrain run` of a three-stage VPGTrans recipe and a TFS recipe on the tiny assets."""
    root = tmp_path_factory.mktemp("vpgtrans")
    base = tiny_config(tiny_assets, root / "unused", **{
        "data.val": str(tiny_assets["val"]), "eval_every": 8, "max_steps": 8, "log_every": 1,
        "model.llm.name_or_path": str(target_llm), "data.train_samples": 32})
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    converter = {"batch_size": 8, "epochs": 3, "holdout": 0.1}
    recipe = {"name": "vt", "output_dir": str(root / "vt"), "defaults": "base.yaml", "stages": [
        {"name": "source", "set": {"model.llm.name_or_path": str(tiny_assets["llm"])}},
        {"name": "warmup", "inherit": [{"from": "source", "modules": ["resampler", "projector"],
                                        "word_converter": converter}],
         "set": {"max_steps": 8, "model.resampler.trainable": "frozen",
                 "optim": {"schedule": "constant", "warmup_steps": 0, "lr_multipliers": {"projector": 5.0}}},
         # The evaluation rebuilds the model through the same converted init (reusing the stage's converter).
         "evals": [{"name": "val", "data": str(tiny_assets["val"]), "generate": 0, "no_ablations": True}]},
        {"name": "finetune", "inherit": [{"from": "warmup", "modules": ["resampler", "projector"]}],
         "set": {"max_steps": 16}},
    ]}
    (root / "vt.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    tfs = {"name": "tfs", "output_dir": str(root / "tfs"), "defaults": "base.yaml",
           "stages": [{"name": "tfs", "set": {"max_steps": 16}}]}
    (root / "tfs.yaml").write_text(yaml.safe_dump(tfs, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for recipe_file in ("vt.yaml", "tfs.yaml"):
        proc = subprocess.run([sys.executable, "-m", "mmtrain", "run", str(root / recipe_file)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_warmup_starts_from_converter_after_source_projector(vpgtrans_run, tiny_assets):
    from mmtrain.methods.vpgtrans.converter import load_converter
    from mmtrain.methods.vpgtrans.merge import merge_projector

    root = vpgtrans_run
    warmup = root / "vt" / "02-warmup"
    report = json.loads((warmup / "word_converter.json").read_text())
    assert json.loads((warmup / "eval" / "val.json").read_text())["headline"]["loss"] > 0
    assert report["same_tokenizer"] and report["texts_heldout"] > 0
    assert report["heldout_cosine"] > report["heldout_cosine_initial"]
    # The harness dumps the model as the warm-up stage starts (after init) and after 2 steps.
    proc = subprocess.run([sys.executable, HARNESS, str(warmup / "stage_config.yaml"), "--set",
                           f"output_dir={root / 'replay'}", "max_steps=2", "eval_every=0", "checkpoint.resume=never"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    initial = load_file(str(root / "replay" / "dump" / "initial.safetensors"))
    final = load_file(str(root / "replay" / "dump" / "final.safetensors"))
    source = load_file(str(root / "vt" / "01-source" / "checkpoints" / "step_00000008" / "trainable.safetensors"))
    weight, bias, _ = load_converter(root / "replay" / "word_converter.safetensors")
    merged_w, merged_b = merge_projector(source["projector.weight"], source["projector.bias"], weight, bias)
    assert torch.allclose(initial["projector.weight"], merged_w, atol=1e-6)
    assert torch.allclose(initial["projector.bias"], merged_b, atol=1e-6)
    # The replay fitted the same converter the stage did (deterministic).
    stage_weight, _, _ = load_converter(warmup / "word_converter.safetensors")
    assert torch.allclose(weight, stage_weight, atol=1e-6)
    # The resampler is the source's, unchanged; in stage 1 only the projector moves.
    for name, tensor in initial.items():
        if name.startswith("resampler."):
            assert torch.equal(tensor, source[name]), name
        if name.startswith("projector."):
            assert not torch.equal(final[name], tensor), name
        else:
            assert torch.equal(final[name], tensor), name


def test_warmup_lr_is_exactly_five_times_and_constant(vpgtrans_run):
    warmup = vpgtrans_run / "vt" / "02-warmup"
    base_lr = yaml.safe_load((warmup / "stage_config.yaml").read_text())["optim"]["lr"]
    logged = [r["lr_groups"] for r in _records(warmup) if "lr_groups" in r]
    assert len(logged) == 8
    for groups in logged:
        assert set(groups) == {"projector", "projector/no_decay"}  # nothing else trains
        assert all(lr == 5.0 * base_lr for lr in groups.values())
    finetune = _records(vpgtrans_run / "vt" / "03-finetune")
    groups = [r["lr_groups"] for r in finetune if "lr_groups" in r]
    assert {"resampler", "projector"} <= set(groups[0])
    assert groups[0]["projector"] == groups[0]["resampler"] < base_lr  # normal schedule: linear warm-up


def test_curves_and_speedup_report(vpgtrans_run):
    from mmtrain.cost.curve import folder_compute
    from mmtrain.methods.vpgtrans.speedup import read_curve

    root = vpgtrans_run
    curve = read_curve(root / "vt", folder_compute)
    assert curve.prior_stages == ["01-source"] and curve.prior_compute_s > 0
    assert [round(p.epoch, 6) for p in curve.points] == [1.0, 2.0, 3.0]  # 32 samples = 8 steps of 4
    assert all(b.compute_s > a.compute_s for a, b in zip(curve.points, curve.points[1:]))
    # FLOPs from the ledger's validation records.
    assert all(p.flops is not None for p in curve.points) and curve.prior_flops > 0
    assert curve.points[0].flops > 0 and all(b.flops > a.flops for a, b in zip(curve.points, curve.points[1:]))
    out = root / "speedup.json"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "transfer", "speedup", str(root / "vt"), str(root / "tfs"),
                           "--out", str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "val_loss" in proc.stdout and "speed-up" in proc.stdout
    report = json.loads(out.read_text())
    (loss,) = [s for s in report["speedups"] if s["metric"] == "val_loss"]
    assert loss["tfs_best_epoch"] in [p["epoch"] for p in report["tfs"]["points"]]
    assert loss["tfs_flops"] > 0
    if loss["vt_epoch"] is not None:
        assert loss["speedup_epochs"] == pytest.approx(loss["tfs_best_epoch"] / loss["vt_epoch"])
        assert loss["speedup_flops"] == pytest.approx(loss["tfs_flops"] / loss["vt_flops"])


def test_converter_under_two_rank_zero3_equals_single_process(vpgtrans_run):
    """Both LLMs' tables are read whole (the target's gathered from its ZeRO-3 partitions)."""
    root = vpgtrans_run
    warmup = root / "vt" / "02-warmup"
    out = root / "zero3"
    launch([HARNESS, str(warmup / "stage_config.yaml"), "--set", f"output_dir={out}", "max_steps=1", "eval_every=0",
            "checkpoint.resume=never", f"deepspeed={REPO / 'ds_configs' / 'zero3.json'}"], nprocs=2)
    from mmtrain.methods.vpgtrans.converter import load_converter

    sharded, _, meta = load_converter(out / "word_converter.safetensors")
    single, _, _ = load_converter(warmup / "word_converter.safetensors")
    assert torch.allclose(sharded, single, atol=1e-5)
    assert meta["pairs_heldout"] == json.loads((warmup / "word_converter.json").read_text())["pairs_heldout"]
    initial = load_file(str(out / "dump" / "initial.safetensors"))
    assert initial["projector.weight"].shape == (96, 32)


def test_cli_converter_and_merge(vpgtrans_run, tiny_assets, target_llm, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    conv = tmp_path / "conv.safetensors"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "transfer", "converter", "--source", str(tiny_assets["llm"]),
                           "--target", str(target_llm), "--source-tokenizer", str(tiny_assets["tokenizer"]),
                           "--target-tokenizer", str(tiny_assets["tokenizer"]), "--corpus", str(tiny_assets["train"]), "--out", str(conv),
                           "--batch-size", "8", "--epochs", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "held-out cosine" in proc.stdout and json.loads(conv.with_suffix(".json").read_text())["steps"] > 0
    merged = tmp_path / "merged.safetensors"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "transfer", "merge", "--checkpoint",
                           str(vpgtrans_run / "vt" / "01-source"), "--converter", str(conv), "--out", str(merged)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert load_file(str(merged))["projector.weight"].shape == (96, 32)
    bad = subprocess.run([sys.executable, "-m", "mmtrain", "transfer", "merge", "--checkpoint", str(tmp_path / "nope"),
                          "--converter", str(conv), "--out", str(tmp_path / "x.safetensors")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no trainable-weights file" in bad.stderr
