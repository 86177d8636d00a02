"""The checkpoint layouts a surrogate can be built from, and how a cut maps and renames layers.

Supported: decoder-only Hugging Face causal LMs whose tensors are `model.embed_tokens.weight`,
`model.layers.{i}.<...>`, `model.norm.weight` and (unless the embeddings are tied) `lm_head.weight`
(Llama, Mistral, Qwen2, Qwen3). For a cut K of a target with L layers the surrogate keeps target
layers 0..K-1 at the same indices, a translator copied from target layer K at index K, and the
target's last layer L-1 at index K+1.
"""

from __future__ import annotations

import re
from typing import Any

from mmtrain.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBEDDINGS = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
PER_LAYER_CONFIG_KEYS = ("layer_types",)


class SurrogateBuildError(UserError, ValueError):
    """The target cannot be turned into a surrogate (unsupported, incomplete or bad arguments)."""


def supported_layouts() -> str:
    return (f"model_type one of {', '.join(SUPPORTED_MODEL_TYPES)} with tensors {EMBEDDINGS}, "
            f"model.layers.{{i}}.*, {FINAL_NORM}[, {LM_HEAD}]")


def check_model_type(config: dict[str, Any]) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SurrogateBuildError(f"unsupported model_type {model_type!r}; supported layouts: {supported_layouts()}")


def num_layers(config: dict[str, Any]) -> int:
    value = config.get("num_hidden_layers")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SurrogateBuildError(f"config.json has no valid num_hidden_layers (found {value!r})")
    return value


def check_cut(cut: Any, total: int) -> None:
    if not isinstance(cut, int) or isinstance(cut, bool):
        raise SurrogateBuildError(f"the cut must be an integer, got {cut!r}")
    if total < 3:
        raise SurrogateBuildError(f"the target has L={total} layers; a surrogate needs a target with at least 3")
    if not 1 <= cut <= total - 2:
        raise SurrogateBuildError(f"cut K={cut} is out of range: the target has L={total} layers, "
                                  f"so K must be in 1..{total - 2} (1..L-2)")


def layer_map(total: int, cut: int) -> dict[int, int]:
    """Surrogate layer index -> target layer index."""
    mapping = {i: i for i in range(cut + 1)}
    mapping[cut + 1] = total - 1
    return mapping


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer index, rest of the name) for a decoder-layer tensor, None for any other tensor."""
    match = LAYER_RE.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def check_tensor_names(names: list[str], total: int, tied: bool) -> None:
    """The checkpoint has the supported layout, every one of the target's `total` layers, the final
    norm and, unless the embeddings are `tied`, the LM head."""
    layers: dict[int, set[str]] = {}
    for name in names:
        split = split_layer_name(name)
        if split is not None:
            layers.setdefault(split[0], set()).add(split[1])
    # Tied checkpoints may store the shared matrix under either name (transformers 5 keeps `lm_head.weight`).
    has_embeddings = EMBEDDINGS in names or (tied and LM_HEAD in names)
    if not layers or not has_embeddings:
        shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
        raise SurrogateBuildError(f"the checkpoint's tensors ({shown}) do not match the supported layouts: "
                                  f"{supported_layouts()}")
    required = [FINAL_NORM] + ([] if tied else [LM_HEAD])
    if any(name not in names for name in required):
        lacking = ", ".join(name for name in required if name not in names)
        raise SurrogateBuildError(f"the checkpoint lacks {lacking}"
                                  + ("" if tied else " (config.json does not set tie_word_embeddings)"))
    missing = sorted(set(range(total)) - set(layers))
    extra = sorted(set(layers) - set(range(total)))
    if missing or extra:
        raise SurrogateBuildError(f"the checkpoint does not hold exactly the config's {total} layers: "
                                  f"missing layer indices {missing}, unexpected layer indices {extra}")
    first = layers[0]
    for index, suffixes in sorted(layers.items()):
        if suffixes != first:
            raise SurrogateBuildError(f"layer {index} has different tensors from layer 0: missing "
                                      f"{sorted(first - suffixes)}, extra {sorted(suffixes - first)}")


def surrogate_name(name: str, target_to_surrogate: dict[int, int]) -> str | None:
    """The tensor's name in the surrogate, None for a tensor of a dropped layer."""
    split = split_layer_name(name)
    if split is None:
        return name
    index, rest = split
    if index not in target_to_surrogate:
        return None
    return f"model.layers.{target_to_surrogate[index]}.{rest}"


def surrogate_config(config: dict[str, Any], cut: int) -> dict[str, Any]:
    """The target's config.json with the surrogate's layer count and per-layer settings."""
    total = num_layers(config)
    mapping = layer_map(total, cut)
    out = dict(config)
    out["num_hidden_layers"] = len(mapping)
    for key in PER_LAYER_CONFIG_KEYS:
        values = config.get(key)
        if isinstance(values, list):
            if len(values) != total:
                raise SurrogateBuildError(f"config.json's {key} has {len(values)} entries for {total} layers")
            out[key] = [values[mapping[i]] for i in range(len(mapping))]
    window = config.get("max_window_layers")
    if isinstance(window, int) and not isinstance(window, bool):
        # Qwen2: layers with index >= max_window_layers use sliding-window attention. The map is
        # increasing, so counting the kept layers below the threshold keeps every layer's kind.
        out["max_window_layers"] = sum(1 for target in mapping.values() if target < window)
    return out
