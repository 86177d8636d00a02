"""Zero-shot grafting: a vision side trained against one LLM (a surrogate) loaded into another.

The run's model is rebuilt with `model.llm` replaced by the graft target (frozen), and only the
vision side (`vision`, `resampler`, `projector`: tower, adapter, begin/end-of-image embeddings)
is loaded from the run's `init` sources and checkpoint. Nothing of the run's LLM (a surrogate's
translator, for one) reaches the target. Both LLMs must share the embedding width and the
tokenizer, as a surrogate and its target do.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mmtrain.config.schema import InitSource, RunConfig
from mmtrain.errors import UserError

VISION_SIDE = ("vision", "resampler", "projector")


class GraftError(UserError, ValueError):
    """The run's vision side cannot be grafted onto the named LLM."""


def vision_side_modules(modules: list[str]) -> list[str]:
    """The part of an init source's module selection that lies in the vision side (empty list = all)."""
    if not modules:
        return list(VISION_SIDE)
    return [m for m in modules if m.split(".")[0] in VISION_SIDE]


def vision_side_sources(sources: list[InitSource]) -> list[InitSource]:
    """`sources` narrowed to the vision side; sources with nothing of it are dropped."""
    narrowed = []
    for source in sources:
        modules = vision_side_modules(source.modules)
        if modules:
            narrowed.append(dataclasses.replace(source, modules=modules))
    return narrowed


def _llm_config(folder: str, what: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise GraftError(f"{what}: {path} does not exist; name a Hugging Face model folder")
    return json.loads(path.read_text())


def check_compatible(run_llm: str | None, graft_llm: str) -> None:
    """Fail early, naming both, when the target's embedding width or vocabulary differ from the run's LLM."""
    target = _llm_config(graft_llm, "--graft-llm")
    if run_llm is None:
        return
    trained = _llm_config(run_llm, "the run's model.llm.name_or_path")
    for key in ("hidden_size", "vocab_size"):
        if trained.get(key) != target.get(key):
            raise GraftError(f"cannot graft onto {graft_llm}: its {key} is {target.get(key)} but the vision side was "
                             f"trained for {run_llm} with {key} {trained.get(key)}; a surrogate and its target share "
                             "both (train against a surrogate of this target)")


def graft_config(cfg: RunConfig, graft_llm: str) -> RunConfig:
    """`cfg` with the LLM replaced by `graft_llm` (frozen) and every init source narrowed to the vision side."""
    check_compatible(cfg.model.llm.name_or_path, graft_llm)
    grafted = dataclasses.replace(cfg)
    grafted.model = dataclasses.replace(cfg.model, llm=dataclasses.replace(
        cfg.model.llm, name_or_path=graft_llm, config=None, trainable="frozen"))
    grafted.init = vision_side_sources(cfg.init)
    return grafted


def checkpoint_source(checkpoint: str | Path) -> InitSource:
    """The run checkpoint's vision-side tensors as an init source."""
    return InitSource(path=str(checkpoint), modules=list(VISION_SIDE))
