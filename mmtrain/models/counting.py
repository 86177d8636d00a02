"""Parameter counts of a run config without allocating a single weight (`mmtrain params`).

The VLM is built on PyTorch's meta device: every pretrained part (LLM, Hugging Face or MobileNetV2
tower) is built from its config file alone, so a 70B configuration is counted in seconds on a
laptop. Counts are per component (trainable / frozen) plus the trainable parameters by kind
(MMA adapters, routers, modality token, LoRA, VL-PET modules...).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from dataclasses import replace

import torch
from torch import nn

from mmtrain.config import load_config
from mmtrain.config.schema import ModelConfig
from mmtrain.errors import EXIT_USER_ERROR, report_user_errors
from mmtrain.models.build import build_vlm
from mmtrain.models.mobilenet_v2 import CONFIG_FILE, RANDOM_CONFIG_KEYS, resolve_pretrained_folder
from mmtrain.models.trainability import format_parameter_table, numel, parameter_table
from mmtrain.models.vision import processor_input_size
from mmtrain.utils.io import atomic_write_json

# Name fragments that say which method a trainable parameter belongs to, checked in order.
KINDS = (
    (".mma_adapter.router.", "MMA routers"),
    (".mma_adapter.", "MMA adapters"),
    ("llm.modality.", "modality token"),
    (".lora_", "LoRA"),
    (".vl_pet_value.", "VL-PET value adapters"),
    (".vl_pet_", "VL-PET modules"),
    ("layer_norm", "LayerNorms"),
    ("layernorm", "LayerNorms"),
)


def config_only(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` whose pretrained parts are built from their config files (no weights read)."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoConfig, AutoImageProcessor

    cfg = copy.deepcopy(cfg)
    if cfg.llm.name_or_path:
        loaded = AutoConfig.from_pretrained(cfg.llm.name_or_path, trust_remote_code=cfg.llm.trust_remote_code)
        cfg.llm = replace(cfg.llm, name_or_path=None, config=loaded.to_dict(), quantization="none",
                          tokenizer=cfg.llm.tokenizer or cfg.llm.name_or_path)
    if cfg.vision.name_or_path:
        if cfg.vision.kind == "hf":
            loaded = AutoConfig.from_pretrained(cfg.vision.name_or_path)
            # the pretrained image processor fixes the input size the tower runs at (DINOv2: 224 px on
            # position embeddings for 518): keep it, or the token count differs from the real model's
            image_size = cfg.vision.image_size or processor_input_size(
                AutoImageProcessor.from_pretrained(cfg.vision.name_or_path))
            cfg.vision = replace(cfg.vision, name_or_path=None, config=loaded.to_dict(), image_size=image_size)
        elif cfg.vision.kind == "mobilenetv2":
            saved = json.loads((resolve_pretrained_folder(cfg.vision.name_or_path) / CONFIG_FILE).read_text())
            cfg.vision = replace(cfg.vision, name_or_path=None,
                                 config={k: v for k, v in saved.items() if k in RANDOM_CONFIG_KEYS})
    return cfg


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The VLM of `cfg` on the meta device (shapes only), trainability applied."""
    with torch.device("meta"):
        model, _, _ = build_vlm(config_only(cfg), with_tokenizer=False)
    return model


def trainable_by_kind(model: nn.Module) -> dict[str, int]:
    """Trainable parameters grouped by the method they belong to (else by component)."""
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = next((label for fragment, label in KINDS if fragment in name), None)
        if kind is None:
            component = name.split(".", 1)[0]
            kind = f"{component} (other)" if component in ("vision", "llm") else component
        counts[kind] += numel(p)
    return dict(counts)


def count_parameters(cfg: ModelConfig) -> dict:
    """{"components": parameter_table rows, "trainable_by_kind": {...}, "trainable_share_without_vision"}
    for `cfg`, on the meta device. The last is trainable / every parameter but the vision tower's:
    how papers that train on precomputed image features (VL-PET) state their budgets."""
    model = build_on_meta(cfg)
    rows = parameter_table(model)
    by_name = {row["component"]: row for row in rows}
    without_vision = int(by_name["total"]["total"]) - int(by_name["vision"]["total"])
    return {"components": rows, "trainable_by_kind": trainable_by_kind(model),
            "trainable_share_without_vision": int(by_name["total"]["trainable"]) / max(without_vision, 1)}


def format_counts(result: dict) -> str:
    """The component table, then the trainable parameters by kind."""
    lines = [format_parameter_table(result["components"]), "", "trainable by kind:"]
    total = sum(result["trainable_by_kind"].values())
    for kind, count in sorted(result["trainable_by_kind"].items(), key=lambda item: -item[1]):
        lines.append(f"  {kind:<22} {count:>14,}  ({count / 1e6:.2f}M)")
    lines.append(f"  {'total':<22} {total:>14,}  ({total / 1e6:.2f}M)")
    lines.append(f"trainable share of all parameters but the vision tower's: "
                 f"{100 * result['trainable_share_without_vision']:.2f}%")
    return "\n".join(lines)


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain params") -> int:
    """`mmtrain params CONFIG.yaml [--set KEY=VALUE ...] [--json OUT]`; exit 2 with `error: ...` when the
    config (a UserError such as ConfigError) or the model files it names cannot be used."""
    parser = argparse.ArgumentParser(prog=prog, description="Count trainable and frozen parameters per component "
                                     "of a run config on the meta device (no weights are loaded or allocated).")
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        result = count_parameters(cfg.model)
    except (ValueError, OSError) as error:  # also transformers' own: a model folder or config it cannot read
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(format_counts(result))
    if args.json:
        atomic_write_json(args.json, {"config": args.config, **result})
    return 0
