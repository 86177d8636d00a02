"""User errors: `report_user_errors`, the config value rules, a resume from another model's checkpoint,
and the entry points, which all end a user error with `error: MESSAGE` and exit status 2 (no traceback)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmtrain.config.loader import ConfigError, from_dict
from mmtrain.config.rules import LR_COMPONENTS, check_training, check_values, value_problems
from mmtrain.config.schema import RunConfig
from mmtrain.errors import EXIT_USER_ERROR, UserError, report_user_errors
from tests.conftest import REPO, tiny_config, write_config


# ------------------------------------------------------------------------------------ report_user_errors
def test_report_user_errors_prints_error_and_returns_2(capsys):
    @report_user_errors
    def main(argv=None) -> int:
        raise ConfigError("c.yaml: `optim.lr` = -1 must be > 0")

    assert main() == EXIT_USER_ERROR == 2
    captured = capsys.readouterr()
    assert captured.err == "error: c.yaml: `optim.lr` = -1 must be > 0\n" and captured.out == ""


def test_report_user_errors_passes_results_and_other_errors_through():
    @report_user_errors
    def ok(code: int) -> int:
        return code

    @report_user_errors
    def bug() -> int:
        raise KeyError("a bug keeps its traceback")

    assert ok(3) == 3 and ok.__name__ == "ok"
    with pytest.raises(KeyError):
        bug()


# ------------------------------------------------------------------------------------------ value rules
def _config(**values) -> RunConfig:
    """The defaults with dotted keys set, built without load_config (which may apply the rules itself)."""
    cfg = RunConfig()
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return cfg


BAD_VALUES = [
    ("optim.lr", -0.001), ("optim.lr", 0.0), ("optim.lr", math.nan), ("optim.lr", math.inf),
    ("micro_batch_size", 0), ("grad_accum_steps", 0), ("max_steps", 0), ("stop_after_steps", 0),
    ("log_every", 0), ("eval_every", -1), ("checkpoint.save_every", -1), ("checkpoint.keep_last", -1),
    ("optim.warmup_steps", -1), ("optim.min_lr_ratio", -0.1), ("optim.min_lr_ratio", 1.5),
    ("optim.weight_decay", -0.01), ("optim.eps", 0.0), ("grad_clip", -1.0), ("data.max_length", 0),
    ("data.num_workers", -1), ("data.train_samples", 0), ("data.val_samples", 0), ("collective_timeout_s", 0),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_each_rule_names_its_key_and_value(key, value):
    with pytest.raises(ConfigError) as caught:
        check_values(_config(**{key: value}), "run.yaml")
    message = str(caught.value)
    assert message.startswith(f"run.yaml: `{key}` = {value!r} must be"), message
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


def test_the_reported_lr_message():
    with pytest.raises(ConfigError, match=r"^c\.yaml: `optim\.lr` = -0\.001 must be > 0 \(e\.g\. 1e-4\)$"):
        check_values(_config(**{"optim.lr": -0.001}), "c.yaml")


@pytest.mark.parametrize("betas, key", [((1.0, 0.999), "optim.betas[0]"), ((0.9, -0.1), "optim.betas[1]")])
def test_betas_in_zero_one(betas, key):
    with pytest.raises(ConfigError, match=re.escape(f"`{key}` = ") + r".* must be in \[0, 1\)"):
        check_values(_config(**{"optim.betas": betas}), "c.yaml")


def test_lr_multipliers_keys_and_values():
    with pytest.raises(ConfigError, match=r"`optim\.lr_multipliers\.projector` = 0 must be > 0"):
        check_values(_config(**{"optim.lr_multipliers": {"projector": 0}}), "c.yaml")
    with pytest.raises(ConfigError, match=r"`optim\.lr_multipliers\.projecter`: unknown component 'projecter'\. "
                                          r"Did you mean optim\.lr_multipliers\.projector\?"):
        check_values(_config(**{"optim.lr_multipliers": {"projecter": 2.0}}), "c.yaml")
    check_values(_config(**{"optim.lr_multipliers": {c: 0.5 for c in LR_COMPONENTS}}), "c.yaml")


def test_limits_themselves_and_optional_values_are_allowed():
    check_values(_config(**{"micro_batch_size": 1, "grad_accum_steps": 1, "max_steps": 1, "stop_after_steps": None,
                            "log_every": 1, "eval_every": 0, "checkpoint.save_every": 0,
                            "checkpoint.keep_last": 0,  # 0 keeps every checkpoint (save_checkpoint)
                            "optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0, "optim.weight_decay": 0.0,
                            "optim.betas": (0.0, 0.0), "grad_clip": 0.0, "data.num_workers": 0,
                            "data.train_samples": None, "data.val_samples": 1, "collective_timeout_s": 1}), "c.yaml")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        check_values(_config(**{"optim.lr": -1.0, "micro_batch_size": 0}), "c.yaml")
    lines = str(caught.value).splitlines()
    assert lines[0] == "c.yaml: 2 values to fix:"
    assert lines[1].strip().startswith("`optim.lr` = -1.0") and lines[2].strip().startswith("`micro_batch_size` = 0")


def test_quantised_llm_with_a_zero3_json(tmp_path):
    zero3 = str(REPO / "ds_configs" / "zero3.json")
    with pytest.raises(ConfigError, match=re.escape(
            f"c.yaml: model.llm.quantization=4bit: ZeRO-3 cannot partition bitsandbytes-quantised weights; "
            f"use a ZeRO-1/2 config ({zero3} is stage 3)")):
        check_values(_config(**{"model.llm.quantization": "4bit", "deepspeed": zero3}), "c.yaml")
    check_values(_config(**{"model.llm.quantization": "8bit", "deepspeed": str(REPO / "ds_configs" / "zero2.json")}))
    check_values(_config(**{"deepspeed": zero3}))  # ZeRO-3 without quantisation is fine
    # A missing or broken JSON is the engine's to report (it names the file when it loads it).
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path in (tmp_path / "missing.json", broken):
        check_values(_config(**{"model.llm.quantization": "4bit", "deepspeed": str(path)}))


def test_training_rules(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = _config(**{"precision": "fp16", "data.train": "train.jsonl"})
    with pytest.raises(ConfigError, match=r"^c\.yaml: precision=fp16 needs a GPU; on CPU use fp32 \(bf16 works"):
        check_training(cfg, "c.yaml")
    check_values(cfg, "c.yaml")  # loadable anywhere (a login node, `mmtrain params`): only training needs the GPU
    check_training(_config(**{"precision": "bf16", "data.train": "train.jsonl"}), "c.yaml")
    with pytest.raises(ConfigError, match=r"`data\.train`: set the training manifest"):
        check_training(_config(), "c.yaml")


def _repo_run_configs():
    from mmtrain.pipeline.recipe import load_recipe

    for path in sorted((REPO / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if "stages" in raw:
            for stage in load_recipe(path).stages:
                yield f"{path.relative_to(REPO)}:{stage.name}", stage.config
        else:
            yield str(path.relative_to(REPO)), from_dict(RunConfig, raw, source=str(path))


def test_defaults_and_every_shipped_config_pass():
    assert value_problems(RunConfig()) == []
    found = {name: value_problems(cfg) for name, cfg in _repo_run_configs()}
    assert len(found) > 10 and not any(found.values()), found


def test_a_model_with_nothing_to_train_is_a_user_error():
    from torch import nn

    from mmtrain.config.schema import OptimConfig
    from mmtrain.engine.optim import build_param_groups

    model = nn.Module()
    for component in LR_COMPONENTS:
        setattr(model, component, nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ConfigError, match=r"nothing to train: every component is frozen \(set model\.<component>"):
        build_param_groups(model, OptimConfig())


# ------------------------------------------------------------------------- resuming from another model
def _save_trainable(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    from mmtrain.engine.checkpoint import TRAINABLE_FILE

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / TRAINABLE_FILE))
    return path


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.ModuleDict({"projector": nn.Linear(4, 3), "llm": nn.Linear(3, 3)})
    model["llm"].requires_grad_(False)
    return model


def test_checkpoint_of_another_model_names_the_first_mismatches(tmp_path):
    import torch

    from mmtrain.engine.checkpoint import CheckpointMismatchError, check_checkpoint_fits

    model = _model()
    same = _save_trainable(tmp_path / "same", {"projector.weight": torch.zeros(3, 4), "projector.bias": torch.zeros(3)})
    check_checkpoint_fits(model, same)  # frozen parameters are not in a checkpoint
    other = _save_trainable(tmp_path / "other", {"projector.weight": torch.zeros(5, 4),
                                                 "projector.bias": torch.zeros(3),
                                                 "resampler.queries": torch.zeros(2, 4)})
    with pytest.raises(CheckpointMismatchError) as caught:
        check_checkpoint_fits(model, other)
    message = str(caught.value)
    assert message.startswith(f"cannot resume from {other}: ")
    assert "projector.weight (checkpoint [5, 4], model [3, 4])" in message
    assert "1 only in the checkpoint: resampler.queries" in message
    assert "--set checkpoint.resume=never" in message and "output_dir" in message
    assert isinstance(caught.value, UserError)
    model["llm"].requires_grad_(True)
    with pytest.raises(CheckpointMismatchError, match=r"2 only in the model: llm\.weight, llm\.bias"):
        check_checkpoint_fits(model, same)
    check_checkpoint_fits(model, tmp_path / "no-trainable-file")  # nothing to compare: DeepSpeed's load decides


class _Engine:
    """Stands in for a DeepSpeed engine whose load_checkpoint raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.module = _model()
        self.error = error

    def load_checkpoint(self, *args, **kwargs):
        raise self.error


def test_load_checkpoint_turns_only_a_state_dict_mismatch_into_a_user_error(tmp_path):
    from mmtrain.engine.checkpoint import CheckpointMismatchError, load_checkpoint

    folder = tmp_path / "step_00000004"  # without trainable.safetensors: the check relies on DeepSpeed's load
    folder.mkdir()
    torch_message = ("Error(s) in loading state_dict for VisionLanguageModel:\n\tsize mismatch for resampler.queries: "
                     "copying a param with shape torch.Size([4, 32]) from checkpoint, the shape in current model is "
                     "torch.Size([8, 32]).")
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"cannot resume from {folder}: ")
                       + r".*size mismatch for resampler\.queries.*checkpoint\.resume=never"):
        load_checkpoint(_Engine(RuntimeError(torch_message)), folder)
    with pytest.raises(RuntimeError, match="^out of memory$"):
        load_checkpoint(_Engine(RuntimeError("out of memory")), folder)


def test_resume_folder_that_is_not_a_checkpoint_is_a_user_error(tmp_path):
    from mmtrain.engine.checkpoint import resolve_resume

    with pytest.raises(UserError, match="checkpoint.resume=.*not a complete mmtrain checkpoint") as caught:
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert isinstance(caught.value, FileNotFoundError)


# ------------------------------------------------------------------------------------------ entry points
ENTRY_POINTS = [
    ("mmtrain.cli", "main"), ("mmtrain.train", "main"), ("mmtrain.eval.cli", "main"), ("mmtrain.pipeline.cli", "main"),
    ("mmtrain.slurm.cli", "submit_main"), ("mmtrain.slurm.cli", "status_main"), ("mmtrain.cost.cli", "main"),
    ("mmtrain.assets.cli", "main"), ("mmtrain.data.check", "main"), ("mmtrain.models.counting", "main"),
    ("mmtrain.methods.vpgtrans.cli", "main"), ("mmtrain.methods.grafting.cli", "main"),
]


@pytest.mark.parametrize("module, name", ENTRY_POINTS, ids=[f"{m}.{n}" for m, n in ENTRY_POINTS])
def test_every_entry_point_reports_user_errors(module, name):
    import importlib

    main = getattr(importlib.import_module(module), name)
    assert getattr(main, "__wrapped__", None) is not None, f"{module}.{name} is not wrapped by report_user_errors"


def test_entry_points_end_a_user_error_with_status_2(tmp_path, capsys):
    from mmtrain.cli import main

    cases = [
        (["params", str(tmp_path / "missing.yaml")], "cannot read config file"),
        (["status", str(tmp_path)], "jobs.json not found"),
        (["submit", str(tmp_path / "r.yaml"), "--array-over", "seed"], "--array-over 'seed': expected KEY=V1,V2"),
        (["assets", "prepare", "no-such-asset"], "unknown asset(s) no-such-asset"),
        (["surrogate", "build", "asset:no-such-model", "--cut", "1", "--out", str(tmp_path / "o")],
         "unknown asset 'no-such-model'"),
        (["cost", str(tmp_path)], "not found"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, (argv, err)


# --------------------------------------------------------------- the reported cases, end to end (subprocess)
def _train(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "mmtrain.train", str(config)]
    if overrides:
        command += ["--set", *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _assert_user_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    error = next((line for line in proc.stderr.splitlines() if line.startswith("error: ")), None)
    assert error is not None, proc.stderr[-4000:]
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr[-4000:])


@pytest.mark.parametrize("override, key", [("optim.lr=-0.001", "`optim.lr` = -0.001"),
                                           ("micro_batch_size=0", "`micro_batch_size` = 0")])
def test_bad_value_through_the_training_entry_point(tiny_assets, tmp_path, override, key):
    """Needs `load_config` to apply `check_values` (mmtrain/config/loader.py)."""
    config = write_config(tiny_config(tiny_assets, tmp_path / "run"), tmp_path / "config.yaml")
    proc = _train(config, override)
    _assert_user_error(proc, f"error: {config}: {key}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_from_a_differently_shaped_model_through_the_training_entry_point(tiny_assets, tmp_path):
    config = write_config(tiny_config(tiny_assets, tmp_path / "run", max_steps=2, **{"checkpoint.save_every": 2}),
                          tmp_path / "config.yaml")
    first = _train(config)
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == 2
    proc = _train(config, "max_steps=4", "model.resampler.num_queries=8")
    _assert_user_error(proc, f"error: cannot resume from {checkpoint}",
                       "resampler.queries (checkpoint [4, 32], model [8, 32])", "--set checkpoint.resume=never")
    restarted = _train(config, "max_steps=2", "model.resampler.num_queries=8", "checkpoint.resume=never")
    assert restarted.returncode == 0, restarted.stderr[-4000:]
