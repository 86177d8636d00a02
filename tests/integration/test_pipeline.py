"""`mmtrain run RECIPE.yaml` end to end on the tiny assets: inheritance, SIGKILL and resume, failures, evals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.slow


def write_recipe(tmp_path: Path, assets, stages: list, **base_overrides) -> Path:
    """A recipe over the tiny run config (written next to it as base.yaml)."""
    base = tiny_config(assets, tmp_path / "unused", **{"data.val": str(assets["val"]), **base_overrides})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    recipe = {"name": "tiny", "output_dir": str(tmp_path / "runs"), "defaults": "base.yaml", "stages": stages}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmtrain", "run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: (mtime in ns, sha256)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def first_step_loss(config_file: Path, weights: Path | None) -> float:
    """The loss of the model of `config_file` on its first training batch, with `weights` loaded (if any).

    Rebuilds the stage's model and first batch the way the trainer does, but loads the weights
    straight from a checkpoint file (not through the stage's `init`).
    """
    import torch

    from mmtrain.config import load_config
    from mmtrain.data import Collator, StepSampler, VLMDataset
    from mmtrain.engine.trainer import step_seed
    from mmtrain.models import build_vlm, load_trainable_weights

    cfg = load_config(config_file)
    model, tokenizer, _ = build_vlm(cfg.model)
    if weights is not None:
        load_trainable_weights(model, weights, strict=False)
    dataset = VLMDataset.for_model(cfg.data.train, model, tokenizer, cfg.data)
    sampler = StepSampler(len(dataset), cfg.micro_batch_size, 0, 1, cfg.seed, shuffle=cfg.data.shuffle)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in next(iter(sampler))])
    torch.manual_seed(step_seed(cfg.seed, 0, 0, 0))
    model.train()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_two_stages_inherit_survive_sigkill_and_resume(tiny_assets, tmp_path):
    stages = [
        {"name": "align", "set": {"max_steps": 6, "checkpoint.save_every": 3}},
        {"name": "finetune", "inherit": [{"from": "align", "modules": ["resampler", "projector"]}],
         "set": {"max_steps": 40, "model.projector.trainable": "frozen", "optim.lr": 1e-3,
                 "checkpoint": {"save_every": 4, "keep_last": 2}}},
    ]
    recipe = write_recipe(tmp_path, tiny_assets, stages)
    runs = tmp_path / "runs"
    align_dir, finetune_dir = runs / "01-align", runs / "02-finetune"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mmtrain.pipeline", str(recipe)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any((finetune_dir / "checkpoints").glob("step_*/meta.json")):
            output = (tmp_path / "first.log").read_text
            assert proc.poll() is None, f"the pipeline ended before stage 2 saved:\n{output()}"
            assert time.monotonic() < deadline, "stage 2 wrote no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its training subprocess
        proc.wait()
        log.close()
    assert not (finetune_dir / "stage.json").exists()
    killed_at = max(int(p.name[5:]) for p in (finetune_dir / "checkpoints").glob("step_????????"))
    assert killed_at < 40, "stage 2 finished before the kill: nothing was tested"
    align_record = json.loads((align_dir / "stage.json").read_text())
    assert align_record["status"] == "done" and align_record["steps"] == 6
    before = snapshot(align_dir)

    rerun = run_cli([str(recipe)])
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert "skip [1/2] align: done" in rerun.stdout and "resuming from step" in rerun.stdout
    assert snapshot(align_dir) == before  # stage 1 was not touched, let alone redone

    info = json.loads((finetune_dir / "run_info.json").read_text())
    assert info["resumed_from"] and Path(info["resumed_from"]).name.startswith("step_")
    record = json.loads((finetune_dir / "stage.json").read_text())
    assert record["status"] == "done" and record["steps"] == 40
    assert record["final_checkpoint"] == str(finetune_dir / "checkpoints" / "step_00000040")
    timing = record["timing"]
    assert timing["nprocs"] == 1 and timing["device"] == "cpu" and timing["train_attempts"] == 2
    assert timing["train_wall_s"] > 0
    summary = json.loads((runs / "summary.json").read_text())
    assert [(s["name"], s["status"], s["steps"]) for s in summary["stages"]] == [("align", "done", 6),
                                                                                  ("finetune", "done", 40)]
    assert (runs / "recipe.yaml").read_text() == recipe.read_text()

    # Inheritance, checked through the losses: stage 2's first-step loss (logged by the trainer before
    # any update) is the loss of stage 1's final resampler + projector on that batch; without them it is not.
    # The projector stays frozen in stage 2, so its checkpoints never hold it: this is the check for it.
    stage2_cfg = finetune_dir / "stage_config.yaml"
    logged = json.loads((finetune_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1
    inherited = first_step_loss(stage2_cfg, align_dir / "checkpoints" / "step_00000006")
    fresh = first_step_loss(stage2_cfg, None)
    assert logged["loss"] == pytest.approx(inherited, rel=1e-5)
    assert abs(fresh - inherited) > 1e-3


def test_failing_stage_stops_the_pipeline_naming_it(tiny_assets, tmp_path):
    stages = [{"name": "align", "set": {"max_steps": 2, "data.train": str(tmp_path / "missing.jsonl")}},
              {"name": "finetune", "inherit": [{"from": "align", "modules": ["projector"]}]}]
    recipe = write_recipe(tmp_path, tiny_assets, stages)
    proc = run_cli([str(recipe)])
    align_dir = tmp_path / "runs" / "01-align"
    assert proc.returncode == 1
    assert (f"error: stage align failed: training exited with code 2; stage folder: {align_dir}, "
            f"log: {align_dir / 'logs' / 'train.log'}") in proc.stderr
    assert "missing.jsonl" in (align_dir / "logs" / "train.log").read_text()
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("align", "failed"), ("finetune", "not started")]
    assert not (tmp_path / "runs" / "02-finetune").exists()


def test_a_stage_whose_node_was_lost_is_interrupted_not_failed(tiny_assets, tmp_path):
    """The check that tells a lost node from a failure (under SLURM: `mmtrain.slurm.health`) decides what a
    failed training process means: resumable, and the stages waiting for it are left alone."""
    import io

    from mmtrain.cost.ledger import read_ledger
    from mmtrain.pipeline.recipe import load_recipe
    from mmtrain.pipeline.runner import EXIT_NODE_LOST, run_pipeline

    stages = [{"name": "align", "set": {"max_steps": 2, "data.train": str(tmp_path / "missing.jsonl")}}]
    pipeline = load_recipe(write_recipe(tmp_path, tiny_assets, stages))
    hooked = []
    code = run_pipeline(pipeline, out=io.StringIO(), on_failure=[lambda stage, out: hooked.append(stage.name)],
                        lost_node=lambda: "job 7: node(s) n2 (down*) down or not responding")
    assert code == EXIT_NODE_LOST and hooked == []
    record = json.loads((tmp_path / "runs" / "01-align" / "stage.json").read_text())
    assert record["status"] == "interrupted" and "n2 (down*)" in record["message"]
    assert "resumes from the start" in record["message"]
    end = [r for r in read_ledger(tmp_path / "runs" / "ledger.jsonl") if r["event"] == "stage_end"][-1]
    assert end["outcome"] == "node_lost" and end["message"] == record["message"]
    # the same failure with every node healthy is the stage's own
    code = run_pipeline(pipeline, out=io.StringIO(), on_failure=[lambda stage, out: hooked.append(stage.name)],
                        lost_node=lambda: None)
    assert code == 1 and hooked == ["align"]
    assert json.loads((tmp_path / "runs" / "01-align" / "stage.json").read_text())["status"] == "failed"


def test_stage_evals_run_after_training_and_are_not_redone(tiny_assets, tmp_path):
    stages = [{"name": "align", "set": {"max_steps": 2},
               "evals": [{"name": "val", "data": str(tiny_assets["val"]), "max_samples": 4, "generate": 1,
                          "max_new_tokens": 3, "no_ablations": True, "show": 0}]}]
    recipe = write_recipe(tmp_path, tiny_assets, stages)
    proc = run_cli([str(recipe)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stage_dir = tmp_path / "runs" / "01-align"
    result_file = stage_dir / "eval" / "val.json"
    result = json.loads(result_file.read_text())
    assert result["samples"] == 4
    record = json.loads((stage_dir / "stage.json").read_text())
    assert record["evals"] == {"val": result} and record["timing"]["eval_wall_s"] > 0
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["stages"][0]["headline"]["val"] and "val: " in proc.stdout

    # Killed after the eval but before stage.json: the rerun neither retrains nor re-evaluates.
    (stage_dir / "stage.json").unlink()
    mtime = result_file.stat().st_mtime_ns
    proc = run_cli([str(recipe)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "training already finished at step 2" in proc.stdout and "skip [1/1] align eval val" in proc.stdout
    assert result_file.stat().st_mtime_ns == mtime
    assert json.loads((stage_dir / "stage.json").read_text())["status"] == "done"

    # An eval added to a finished stage's recipe runs on the next `mmtrain run`; nothing else is redone.
    stages[0]["evals"].append({"name": "val-first2", "data": str(tiny_assets["val"]), "max_samples": 2,
                               "generate": 0, "no_ablations": True, "show": 0})
    recipe = write_recipe(tmp_path, tiny_assets, stages)
    proc = run_cli([str(recipe)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "training already finished at step 2" in proc.stdout and "skip [1/1] align eval val:" in proc.stdout
    assert json.loads((stage_dir / "eval" / "val-first2.json").read_text())["samples"] == 2
    assert result_file.stat().st_mtime_ns == mtime
    assert set(json.loads((stage_dir / "stage.json").read_text())["evals"]) == {"val", "val-first2"}
