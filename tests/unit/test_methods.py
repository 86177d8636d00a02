"""Methods as plug-ins: the five built-in ones are found with their settings, and a new method is a
new package (here one outside the tree, installed through a `mmtrain.methods` entry point) that adds
a config section, a load-time rule and modules to the model without any edit to mmtrain."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

from mmtrain.config import LLMConfig, VisionConfig, load_config
from mmtrain.config.methods import methods, sections, with_hook
from mmtrain.config.schema import InitSource
from tests.conftest import REPO, TINY_LLM, TINY_VISION, write_config


def test_the_five_methods_are_found_with_their_sections():
    assert {spec.name for spec in methods()} == {"vpgtrans", "grafting", "mma", "vl_pet", "lora"}
    assert [key for key, _, _ in sections("model.llm")] == ["lora", "adapter", "vl_pet"]
    assert [key for key, _, _ in sections("model.vision")] == ["adapter"]
    assert [key for key, _, _ in sections("init")] == ["word_converter"]
    fields = {f.name for f in dataclasses.fields(LLMConfig)}
    assert {"adapter", "vl_pet", "lora"} <= fields and "adapter" in {f.name for f in dataclasses.fields(VisionConfig)}
    assert "word_converter" in {f.name for f in dataclasses.fields(InitSource)}
    attach_order = [spec.name for spec, _ in with_hook("attach")]
    assert attach_order == ["grafting", "mma", "vl_pet", "lora"]
    assert [spec.name for spec, _ in with_hook("load_init")] == ["vpgtrans"]
    assert [spec.name for spec, _ in with_hook("retarget")] == ["grafting"]


def test_method_sections_parse_check_and_round_trip(tmp_path):
    raw = {"model": {"llm": {"config": {"model_type": "llama", **TINY_LLM}, "adapter": {"bottleneck": 4},
                             "lora": {"r": 2}}}}
    path = write_config(raw, tmp_path / "both.yaml")
    try:
        load_config(path)
    except ValueError as exc:
        assert "`model.llm.adapter` (MMA) and `model.llm.lora` are both set" in str(exc)
    else:
        raise AssertionError("MMA adapters with LoRA must fail when the config loads")
    del raw["model"]["llm"]["lora"]
    cfg = load_config(write_config(raw, tmp_path / "mma.yaml"))
    assert cfg.model.llm.adapter.bottleneck == 4 and cfg.model.llm.lora is None


PLUGIN_CONFIG = '''
"""A test method's settings."""
from dataclasses import dataclass


@dataclass
class ScaleGateConfig:
    init: float = 1.0


SECTIONS = {"model.llm": {"scale_gate": ScaleGateConfig}}
'''

PLUGIN_METHOD = '''
"""A test method: one learnable scalar on the LLM, trained as an adapter."""
import torch

from mmtrain.config.loader import ConfigError
from mmtrain.config.methods import MethodSpec
from mmtrain.models.trainability import mark_adapter


class ScaleGate(torch.nn.Module):
    def __init__(self, init):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(init)))


def check(cfg, source):
    gate = cfg.model.llm.scale_gate
    if gate is not None and gate.init <= 0:
        raise ConfigError(f"{source}: `model.llm.scale_gate.init` must be > 0, got {gate.init}")


def attach(model, cfg):
    if cfg.llm.scale_gate is not None:
        model.llm.scale_gate = mark_adapter(ScaleGate(cfg.llm.scale_gate.init))


METHOD = MethodSpec(name="scale_gate", summary="test plug-in", attach_order=50, check=check, attach=attach)
'''

PROBE = '''
import sys
from mmtrain.config import load_config
from mmtrain.config.methods import methods
from mmtrain.models import build_vlm, parameter_table
cfg = load_config(sys.argv[1])
print("methods", sorted(m.name for m in methods()))
model, _, _ = build_vlm(cfg.model, with_tokenizer=False)
rows = {row["component"]: row for row in parameter_table(model)}
print("llm_trainable", rows["llm"]["trainable"], "gate", float(model.llm.scale_gate.value))
'''


def test_a_new_method_is_a_new_package(tmp_path):
    plugins = tmp_path / "site"
    package = plugins / "mmtrain_scale_gate"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A method plug-in outside the mmtrain tree."""\n')
    (package / "config.py").write_text(textwrap.dedent(PLUGIN_CONFIG))
    (package / "method.py").write_text(textwrap.dedent(PLUGIN_METHOD))
    metadata = plugins / "mmtrain_scale_gate-0.1.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: mmtrain-scale-gate\nVersion: 0.1\n")
    (metadata / "entry_points.txt").write_text("[mmtrain.methods]\nscale_gate = mmtrain_scale_gate\n")
    model = {"vision": {"config": TINY_VISION, "trainable": "frozen"},
             "resampler": {"kind": "mlp", "hidden_size": 16},
             "llm": {"config": {"model_type": "llama", **TINY_LLM}, "trainable": "adapters",
                     "scale_gate": {"init": 0.5}}}
    good = write_config({"model": model}, tmp_path / "good.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(good)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'scale_gate'" in proc.stdout and "llm_trainable 1 gate 0.5" in proc.stdout, proc.stdout

    model["llm"]["scale_gate"] = {"init": -1.0}
    bad = write_config({"model": model}, tmp_path / "bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "params", str(bad)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "`model.llm.scale_gate.init` must be > 0" in proc.stderr, proc.stderr[-2000:]
