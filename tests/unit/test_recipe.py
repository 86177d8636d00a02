"""Pipeline recipes: parsing, strictness, stage resolution, inheritance, commands, state and plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from mmtrain.config import ConfigError
from mmtrain.config.loader import dump_config
from mmtrain.pipeline import load_recipe
from mmtrain.pipeline.cli import main as run_main
from mmtrain.pipeline.commands import eval_command, option_flags, train_command
from mmtrain.pipeline.recipe import config_hash
from mmtrain.pipeline.runner import PipelineError, format_plan, move_aside, run_pipeline
from mmtrain.pipeline.state import (
    begin_attempt,
    close_dangling_attempts,
    attempt_totals,
    format_table,
    headline,
    probe,
    read_attempts,
    stage_record,
    summary,
)
from mmtrain.utils.io import atomic_write_json

BASE = {"max_steps": 10, "output_dir": "ignored", "optim": {"lr": 1e-3, "lr_multipliers": {"projector": 2.0}},
        "model": {"resampler": {"num_queries": 4, "trainable": "full"}, "projector": {"trainable": "full"}}}


def write_recipe(tmp_path: Path, stages: list, **top) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir(exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    recipe = {"name": "demo", "output_dir": str(tmp_path / "runs" / "demo"), "defaults": "base.yaml", **top,
              "stages": stages}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


TWO_STAGES = [
    {"name": "align", "set": {"max_steps": 300, "model.resampler.trainable": "full"},
     "evals": [{"name": "test", "data": "test.jsonl", "show": 8}]},
    {"name": "finetune", "inherit": [{"from": "align", "modules": ["resampler", "projector"]}],
     "set": {"model": {"projector": {"trainable": "frozen"}}, "optim.lr": 5e-4}},
]


# ---------------------------------------------------------------------------------------------- resolution
def test_stages_resolve_defaults_set_and_inherit(tmp_path):
    pipeline = load_recipe(write_recipe(tmp_path, TWO_STAGES))
    out = tmp_path / "runs" / "demo"
    align, finetune = pipeline.stages
    assert (align.index, align.folder, finetune.folder) == (1, out / "01-align", out / "02-finetune")
    # defaults (relative to the recipe's folder) + set; the pipeline owns output_dir and resume
    assert align.config.max_steps == 300 and align.config.model.resampler.num_queries == 4
    assert align.config.output_dir == str(out / "01-align") and align.config.checkpoint.resume == "auto"
    assert align.config.init == [] and align.requires == []
    # a nested mapping in `set` merges into the defaults instead of replacing the section
    assert finetune.config.model.projector.trainable == "frozen"
    assert finetune.config.model.projector.kind == "linear" and finetune.config.model.resampler.num_queries == 4
    assert finetune.config.optim.lr == 5e-4 and finetune.config.optim.lr_multipliers == {"projector": 2.0}
    assert finetune.config.max_steps == 10  # not align's override
    assert [(s.path, s.modules, s.strict) for s in finetune.config.init] == [
        (str(out / "01-align" / "checkpoints" / "step_00000300"), ["resampler", "projector"], True)]
    assert finetune.requires == ["align"]
    assert align.evals[0].name == "test" and align.evals[0].options == {"show": 8}


def test_stage_config_replaces_defaults_and_inline_defaults(tmp_path):
    path = write_recipe(tmp_path, [{"name": "a"}, {"name": "b", "config": "other.yaml"}],
                        defaults={"max_steps": 7, "seed": 3})
    (path.parent / "other.yaml").write_text("max_steps: 11\n")
    a, b = load_recipe(path).stages
    assert (a.config.max_steps, a.config.seed) == (7, 3)
    assert (b.config.max_steps, b.config.seed) == (11, 0)


def test_cli_overrides_for_every_stage_and_for_one(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES)
    align, finetune = load_recipe(path, ["max_steps=5", "finetune.max_steps=2", "align.optim.lr=0.1"]).stages
    assert (align.config.max_steps, finetune.config.max_steps) == (5, 2)
    assert align.config.optim.lr == 0.1 and finetune.config.optim.lr == 5e-4
    # the inherited checkpoint follows align's overridden max_steps
    assert finetune.config.init[0].path.endswith("01-align/checkpoints/step_00000005")


def test_frozen_inherited_module_is_carried_from_the_stage_that_trained_it(tmp_path):
    stages = TWO_STAGES + [{"name": "chat", "inherit": [{"from": "finetune", "modules": ["projector", "resampler"]}]}]
    pipeline = load_recipe(write_recipe(tmp_path, stages))
    chat = pipeline.stage("chat")
    out = tmp_path / "runs" / "demo"
    # projector is frozen in finetune (so not in its checkpoint): it comes from align, as finetune's did
    assert [(s.path, s.modules) for s in chat.config.init] == [
        (str(out / "01-align" / "checkpoints" / "step_00000300"), ["projector"]),
        (str(out / "02-finetune" / "checkpoints" / "step_00000010"), ["resampler"]),
    ]
    assert chat.requires == ["align", "finetune"]


def test_word_converter_inherit_fills_the_source_llm_and_tokenizer(tmp_path):
    stages = [
        {"name": "source", "set": {"model.llm": {"name_or_path": "/models/small", "tokenizer": "/tok/small"}}},
        {"name": "warmup", "inherit": [{"from": "source", "modules": ["resampler", "projector"],
                                        "word_converter": {"epochs": 8, "batch_size": 64}}],
         "set": {"model.llm.name_or_path": "/models/big", "model.resampler.trainable": "frozen"}},
        {"name": "finetune", "inherit": [{"from": "warmup", "modules": ["resampler", "projector"]}]},
    ]
    pipeline = load_recipe(write_recipe(tmp_path, stages))
    _, warmup, finetune = pipeline.stages
    (source,) = warmup.config.init
    assert source.modules == ["resampler", "projector"]
    converter = source.word_converter
    assert (converter.source_llm, converter.source_tokenizer) == ("/models/small", "/tok/small")
    assert (converter.epochs, converter.batch_size, converter.lr) == (8, 64, 5.0)
    # The frozen resampler is carried, unchanged, from where warmup got it (the source checkpoint);
    # the projector comes from warmup's own checkpoint: neither goes through the converter again.
    carried, trained = finetune.config.init
    assert carried.modules == ["resampler"] and carried.word_converter is None
    assert carried.path.endswith("01-source/checkpoints/step_00000010")
    assert trained.path.endswith("02-warmup/checkpoints/step_00000010") and trained.word_converter is None
    assert "projector through a word converter" in format_plan(pipeline)


def test_word_converter_needs_a_trained_projector_and_valid_keys(tmp_path):
    frozen = [{"name": "source", "set": {"model.projector.trainable": "frozen"}},
              {"name": "warmup", "inherit": [{"from": "source", "modules": ["resampler"], "word_converter": {}}]}]
    with pytest.raises(ConfigError, match="does not train the projector"):
        load_recipe(write_recipe(tmp_path, frozen))
    typo = [{"name": "source"},
            {"name": "warmup", "inherit": [{"from": "source", "word_converter": {"epoch": 3}}]}]
    with pytest.raises(ConfigError, match=r"word_converter\.epoch.*Did you mean.*epochs"):
        load_recipe(write_recipe(tmp_path, typo))


def test_frozen_module_that_nobody_trained_is_an_error(tmp_path):
    stages = [{"name": "a", "set": {"model.projector.trainable": "frozen"}},
              {"name": "b", "inherit": [{"from": "a", "modules": ["projector"]}]}]
    with pytest.raises(ConfigError, match=r"stages\.b\.inherit\[0\]\.modules: `projector` is frozen in stage `a`"):
        load_recipe(write_recipe(tmp_path, stages))


# ---------------------------------------------------------------------------------------------- strictness
@pytest.mark.parametrize("stages, top, pattern", [
    ([{"name": "a"}], {"outptu_dir": "x"}, r"unknown key `outptu_dir`.*Did you mean output_dir"),
    ([{"name": "a", "sett": {}}], {}, r"unknown key `stages\.a\.sett`.*set"),
    ([{"name": "a", "set": {"max_stesp": 3}}], {}, r"stages\.a\.set: unknown key `max_stesp`.*max_steps"),
    ([{"name": "a", "set": {"optim.lr": "fast"}}], {}, r"stages\.a\.set: `optim\.lr` must be a number"),
    ([{"name": "a"}, {"name": "b", "inherit": [{"form": "a"}]}], {}, r"stages\.b\.inherit\[0\]\.form: unknown key"),
    ([{"name": "a", "inherit": [{"from": "b"}]}, {"name": "b"}], {},
     r"stages\.a\.inherit\[0\]\.from: stage `b` comes after `a`.*move `b` above `a`"),
    ([{"name": "a", "inherit": [{"from": "a"}]}], {}, r"cannot inherit from itself"),
    ([{"name": "a"}, {"name": "b", "inherit": [{"from": "zzz"}]}], {}, r"no stage named 'zzz'; earlier stages: a"),
    ([{"name": "a"}, {"name": "a"}], {}, r"two stages are called 'a'"),
    ([{"name": "a b"}], {}, r"not a valid stage name"),
    ([{"name": "optim"}], {}, r"also a run-config key"),
    ([{"name": "a", "set": {"output_dir": "elsewhere"}}], {}, r"stages\.a\.set\.output_dir: the pipeline sets it"),
    ([{"name": "a", "set": {"checkpoint": {"resume": "never"}}}], {}, r"set\.checkpoint\.resume: the pipeline sets"),
    ([{"name": "a", "evals": [{"name": "t"}]}], {}, r"stages\.a\.evals\[0\]\.data: missing"),
    ([{"name": "a", "evals": [{"name": "t", "data": "d", "out": "x.json"}]}], {}, r"evals\[0\]\.out: the pipeline"),
    ([{"name": "a", "launch": {"nprocs": 0}}], {}, r"stages\.a\.launch\.nprocs: must be at least 1"),
    ([{"name": "a", "launch": {"launcher": "mpirun"}}], {}, r"stages\.a\.launch\.launcher.*deepspeed, torchrun"),
    ([], {}, r"stages: missing or empty"),
])
def test_recipe_errors_name_file_and_key(tmp_path, stages, top, pattern):
    path = write_recipe(tmp_path, stages, **top)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_recipe(path)
    assert str(err.value).startswith(str(path))


def test_bad_key_in_defaults_file_names_that_file(tmp_path):
    path = write_recipe(tmp_path, [{"name": "a"}])
    (path.parent / "base.yaml").write_text("max_steps: 3\nmodel:\n  projector:\n    knd: linear\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key `model\.projector\.knd`"):
        load_recipe(path)


def test_missing_defaults_file_says_paths_are_relative_to_the_recipe(tmp_path):
    path = write_recipe(tmp_path, [{"name": "a"}], defaults="nope.yaml")
    with pytest.raises(ConfigError, match=r"defaults: cannot read .*recipes/nope\.yaml.*relative to the recipe"):
        load_recipe(path)


def test_override_errors(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES)
    with pytest.raises(ConfigError, match=r"`algin` is neither a run-config key nor a stage.*Did you mean align"):
        load_recipe(path, ["algin.max_steps=3"])
    with pytest.raises(ConfigError, match=r"--set output_dir=x: the pipeline sets it"):
        load_recipe(path, ["output_dir=x"])
    with pytest.raises(ConfigError, match=r"unknown key `optim\.lrr`"):
        load_recipe(path, ["align.optim.lrr=3"])


def test_cli_reports_recipe_errors_with_exit_2_and_no_traceback(tmp_path, capsys):
    path = write_recipe(tmp_path, [{"name": "a", "set": {"max_stesp": 3}}])
    assert run_main([str(path), "--plan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: stages.a.set: unknown key `max_stesp`") and "Traceback" not in err
    assert run_main([str(write_recipe(tmp_path, TWO_STAGES)), "--stage", "nope"]) == 2
    assert "no stage named 'nope'; stages: align, finetune" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- commands
def test_train_and_eval_commands(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES)
    align = load_recipe(path).stage("align")
    assert train_command(align, python="py") == ["py", "-m", "mmtrain.train", str(align.folder / "stage_config.yaml")]
    spec = align.evals[0]
    spec.options = {"max_new_tokens": 16, "no_ablations": True, "skip": False, "text": None,
                    "metrics": ["cider", "bleu"], "set": {"data.max_length": 256}}
    assert eval_command(align, spec, python="py") == [
        "py", "-m", "mmtrain", "eval", str(align.folder), "--data", "test.jsonl",
        "--out", str(align.folder / "eval" / "test.json"), "--max-new-tokens", "16", "--no-ablations",
        "--metrics", "cider,bleu", "--set", "data.max_length=256"]
    assert option_flags({"a_b": 1.5, "flag": True}) == ["--a-b", "1.5", "--flag"]


def test_multi_process_commands_run_under_the_launcher(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES, launch={"nprocs": 2})
    align, finetune = load_recipe(path, []).stages
    cmd = train_command(align, port=1234, python="py")
    assert cmd == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "1234",
                   "--no_local_rank", "--module", "mmtrain.train", str(align.folder / "stage_config.yaml")]
    cmd = eval_command(align, align.evals[0], port=1234, python="py")
    assert cmd[:11] == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "1234",
                        "--no_local_rank", "--module", "mmtrain", "eval"]
    path = write_recipe(tmp_path, [{"name": "a", "launch": {"nprocs": 4, "launcher": "torchrun"}}],
                        launch={"nprocs": 2})
    (stage,) = load_recipe(path).stages
    assert train_command(stage, port=99, python="py")[:8] == [
        "py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "99", "-m"]


# ---------------------------------------------------------------------------------------------- hashing
def test_config_hash_ignores_bookkeeping_and_the_run_folder_location(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES)
    base = load_recipe(path).stage("finetune")
    same = load_recipe(path, ["progress_bar=false", "stop_after_steps=3", "checkpoint.save_every=1"]).stage("finetune")
    assert same.config_hash == base.config_hash
    assert load_recipe(path, ["finetune.optim.lr=0.5"]).stage("finetune").config_hash != base.config_hash
    assert load_recipe(path, ["align.max_steps=3"]).stage("finetune").config_hash != base.config_hash  # init path
    original = base.config_hash
    moved = base.config
    moved_root = tmp_path / "elsewhere"
    moved.init[0].path = moved.init[0].path.replace(str(base.folder.parent), str(moved_root))
    assert config_hash(moved, moved_root) == original


def test_config_hash_is_the_same_for_a_relative_and_an_absolute_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, TWO_STAGES)
    absolute = load_recipe(path, output_dir=str(tmp_path / "runs")).stage("finetune")
    relative = load_recipe(path, output_dir="runs").stage("finetune")
    assert relative.config.init[0].path != absolute.config.init[0].path
    assert relative.config_hash == absolute.config_hash
    assert config_hash(relative.config, "runs") == config_hash(relative.config, tmp_path / "runs")


# ---------------------------------------------------------------------------------------------- state, plan
def fake_done(stage, loss=2.5, evals=None):
    """Make a stage folder look like a completed run (checkpoint, metrics, stage.json)."""
    ckpt = stage.final_checkpoint
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": stage.config.max_steps}))
    (stage.folder / "metrics.jsonl").write_text(json.dumps({"step": stage.config.max_steps, "loss": loss}) + "\n")
    dump_config(stage.config, stage.config_file)
    for name, result in (evals or {}).items():
        atomic_write_json(stage.folder / "eval" / f"{name}.json", result)
    atomic_write_json(stage.folder / "stage.json", stage_record(stage, "done"))


def test_plan_shows_folders_states_inheritance_and_commands(tmp_path, capsys):
    path = write_recipe(tmp_path, TWO_STAGES)
    align = load_recipe(path).stage("align")
    fake_done(align, evals={"test": {"headline": {"cider": 0.5}, "loss": 3.0}})
    assert run_main([str(path), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "[1] align: done (step 300/300)" in text and "[2] finetune: not started" in text
    assert f"folder:   {align.folder}" in text and "inherits: resampler, projector from align" in text
    assert "eval:     test (done)" in text and "mmtrain.train" in text
    assert not (tmp_path / "runs" / "demo" / "summary.json").exists()  # --plan writes nothing


def test_changed_config_of_a_completed_stage_is_refused(tmp_path, capsys):
    path = write_recipe(tmp_path, TWO_STAGES)
    fake_done(load_recipe(path).stage("align"))
    changed = load_recipe(path, ["align.optim.lr=0.01"])
    state = probe(changed.stage("align"))
    assert state.done and state.stale and state.changes == ["optim.lr: 0.001 -> 0.01"]
    assert "config changed since: optim.lr: 0.001 -> 0.01" in format_plan(changed)
    with pytest.raises(PipelineError, match=r"align completed .* optim\.lr: 0\.001 -> 0\.01.*--restart-from align"):
        run_pipeline(changed)
    assert run_main([str(path), "--set", "align.optim.lr=0.01"]) == 2
    assert "--restart-from align" in capsys.readouterr().err
    # bookkeeping keys do not make it stale
    assert not probe(load_recipe(path, ["align.progress_bar=false"]).stage("align")).stale


def test_a_completed_stage_whose_stored_config_lacks_a_newer_key_is_not_stale(tmp_path):
    """A stage finished before the schema gained a (defaulted) key still counts as done and unchanged."""
    path = write_recipe(tmp_path, TWO_STAGES)
    align = load_recipe(path).stage("align")
    fake_done(align)
    stored = yaml.safe_load(align.config_file.read_text())
    del stored["model"]["resampler"]["spatial_merge"]  # as written by a version without that key
    align.config_file.write_text(yaml.safe_dump(stored))
    record = json.loads((align.folder / "stage.json").read_text())
    atomic_write_json(align.folder / "stage.json", {**record, "config_hash": "0123456789abcdef"})
    state = probe(load_recipe(path).stage("align"))
    assert state.done and not state.stale and state.changes == []
    (align.config_file).unlink()  # without the stored config, the recorded hash decides
    state = probe(load_recipe(path).stage("align"))
    assert state.stale and "stage_config.yaml is gone" in state.changes[0]


def test_changed_config_of_an_interrupted_stage_with_checkpoints_is_refused(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES)
    align = load_recipe(path).stage("align")
    fake_done(align)
    (align.folder / "stage.json").unlink()  # killed before it finished
    changed = load_recipe(path, ["align.max_steps=400"]).stage("align")
    state = probe(changed)
    assert state.status == "interrupted" and state.step == 300 and state.stale
    assert state.changes == ["max_steps: 300 -> 400"]
    with pytest.raises(PipelineError, match=r"stage align was trained to step 300 .* max_steps: 300 -> 400"):
        run_pipeline(load_recipe(path, ["align.max_steps=400"]))
    assert not probe(load_recipe(path).stage("align")).stale


def test_single_stage_needs_its_inherited_stages_done(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES)
    with pytest.raises(PipelineError, match=r"stage finetune inherits from align, which is not done \(not started\)"
                                            r".*--stage align") as err:
        run_pipeline(load_recipe(path), only="finetune")
    assert err.value.exit_code == 2


def test_restart_moves_the_stage_and_later_ones_aside(tmp_path, capsys):
    stages = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    pipeline = load_recipe(write_recipe(tmp_path, stages))
    for stage in pipeline.stages:
        fake_done(stage)
    moved = move_aside(pipeline, "b", sys.stdout)
    assert [p.name.split(".old-")[0] for p in moved] == [".02-b", ".03-c"]
    assert all(p.is_dir() and (p / "stage.json").is_file() for p in moved)
    assert [probe(s).status for s in pipeline.stages] == ["done", "not started", "not started"]
    assert "moved" in capsys.readouterr().out


def test_dangling_attempts_get_an_estimated_end(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    attempt = begin_attempt(folder, "train")
    attempt_start = attempt["time"]
    (folder / "metrics.jsonl").write_text("{}\n")
    import os

    os.utime(folder / "metrics.jsonl", (attempt_start + 42.0, attempt_start + 42.0))
    close_dangling_attempts(folder)
    close_dangling_attempts(folder)  # idempotent
    ends = [r for r in read_attempts(folder) if r["event"] == "end"]
    assert len(ends) == 1 and ends[0]["estimated"] and ends[0]["wall_s"] == pytest.approx(42.0, abs=0.01)
    assert attempt_totals(folder) == {"train_wall_s": pytest.approx(42.0, abs=0.01), "eval_wall_s": 0.0,
                                      "train_attempts": 1}


def test_summary_table_and_headlines(tmp_path):
    pipeline = load_recipe(write_recipe(tmp_path, TWO_STAGES))
    align = pipeline.stage("align")
    fake_done(align, loss=2.25, evals={"test": {"headline": {"cider": 0.5}, "loss": 3.0}})
    assert headline({"loss": 1.0, "n": 3, "ok": True, "name": "x"}) == {"loss": 1.0, "n": 3}
    assert headline({"headline": {"acc": 0.9}, "loss": 1.0}) == {"acc": 0.9}
    data = summary(pipeline)
    rows = {r["name"]: r for r in data["stages"]}
    assert rows["align"]["status"] == "done" and rows["align"]["train_loss"] == 2.25
    assert rows["align"]["headline"] == {"test": {"cider": 0.5}} and rows["finetune"]["status"] == "not started"
    table = format_table(data)
    assert "align" in table and "2.2500" in table and "test: cider=0.5" in table and "300/300" in table
