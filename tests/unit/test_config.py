"""Strict config loading: unknown keys, types, choices, overrides."""

from __future__ import annotations

import pytest

from mmtrain.config import ConfigError, RunConfig, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "max_steps: 7\noptim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\nmodel:\n  resampler:\n    num_queries: 3\n")
    cfg = load_config(path, ["optim.lr=2e-3", "data.bad_samples=skip", "model.llm.config={model_type: llama}"])
    assert isinstance(cfg, RunConfig)
    assert cfg.max_steps == 7 and cfg.optim.lr == 2e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.resampler.num_queries == 3 and cfg.data.bad_samples == "skip"
    assert cfg.model.llm.config == {"model_type": "llama"}


def test_yaml_reads_exponent_without_dot_as_float(tmp_path):
    assert load_config(write(tmp_path, "optim:\n  lr: 1e-4\n")).optim.lr == pytest.approx(1e-4)


def test_unknown_key_names_key_suggestion_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model:\n  resampler:\n    num_querys: 4\n"))
    msg = str(err.value)
    assert "model.resampler.num_querys" in msg and "model.resampler.num_queries" in msg and "hidden_size" in msg
    assert "c.yaml" in msg


def test_unknown_top_level_key_via_override():
    with pytest.raises(ConfigError, match="max_step`.*max_steps"):
        load_config(None, ["max_step=3"])


def test_invalid_choice_lists_choices():
    with pytest.raises(ConfigError, match="data.bad_samples.*error, skip"):
        load_config(None, ["data.bad_samples=ignore"])


@pytest.mark.parametrize("override, key", [("max_steps=ten", "max_steps"), ("seed=1.5", "seed"),
                                           ("progress_bar=3", "progress_bar"), ("optim.betas=[0.9]", "optim.betas")])
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["max_steps"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr_multipliers={projector: 5.0}", "max_steps=3"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
