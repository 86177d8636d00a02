"""VPGTrans as a plug-in: an `init` (or `inherit`) entry with a `word_converter` loads the source run's
VPG and maps its projector into this run's LLM through the fitted word converter."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mmtrain.config.loader import ConfigError
from mmtrain.config.methods import MethodSpec
from mmtrain.config.schema import InitSource, RunConfig
from mmtrain.methods.vpgtrans.config import WordConverterConfig
from mmtrain.methods.vpgtrans.init import load_converted_init


def load_init(model: Any, source: InitSource, cfg: RunConfig, tokenizer: Any, run_dir: Path) -> list[str] | None:
    """The init entry's weights with the projector converted, or None when it has no word converter."""
    if source.word_converter is None:
        return None
    return load_converted_init(model, source, cfg, tokenizer, run_dir)


def resolve_inherit(name: str, section: Any, stage: str, inherited: RunConfig, inherited_trained: set[str],
                    key: str) -> Any:
    """A recipe's `inherit[].word_converter`: the source LLM (and tokenizer) default to the inherited stage's."""
    if name != "word_converter" or not isinstance(section, WordConverterConfig):
        return section
    converter = dataclasses.replace(section)
    if converter.source_llm is None:
        converter.source_llm = inherited.model.llm.name_or_path
        converter.source_tokenizer = converter.source_tokenizer or inherited.model.llm.tokenizer
    if "projector" not in inherited_trained:
        raise ConfigError(f"{key}: stage `{stage}` does not train the projector, so there is no source projector "
                          "to convert; inherit from the stage that trained it")
    return converter


METHOD = MethodSpec(
    name="vpgtrans",
    summary="VPGTrans: transfer a visual prompt generator from a small LLM to a large one (word converter, "
            "merged projector, warm-up, fine-tune)",
    attach_order=40,
    load_init=load_init,
    resolve_inherit=resolve_inherit,
)
