"""Applying an `init` source with a word converter: VPGTrans's starting point for the target LLM.

The selected tensors other than the projector (the resampler, inherited unchanged) load as usual;
the projector is replaced by converter-after-projector. The converter is fitted once per run folder
(rank 0 fits; every rank reads the file) and reused when the run resumes; its report, with the
held-out cosine, goes to `<output_dir>/word_converter.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mmtrain.config.schema import InitSource, RunConfig
from mmtrain.methods.vpgtrans.config import WordConverterConfig
from mmtrain.methods.vpgtrans.converter import (
    CONVERTER_FILE,
    ConverterError,
    corpus_texts,
    fit_word_converter,
    load_converter,
    pair_tokens,
    save_converter,
)
from mmtrain.methods.vpgtrans.embeddings import gathered_embedding_table, read_embedding_table
from mmtrain.methods.vpgtrans.merge import PROJECTOR_KEYS, merge_projector
from mmtrain.models.weights import (IncompatibleCheckpointError, WeightsFileMissingError, load_init_weights, renamed,
                                    trainable_weights_file)
from mmtrain.utils.io import atomic_write_json

log = logging.getLogger("mmtrain")
REPORT_FILE = "word_converter.json"


def _file_names(path: Path, rename: dict[str, str]) -> dict[str, str]:
    """Model-side name -> file-side name of every tensor in a safetensors file, after `rename`."""
    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())
    return {renamed(name, rename): name for name in names}


def _is_projector(module: str) -> bool:
    return module == "projector" or module.startswith("projector.")


def converter_key(settings: WordConverterConfig, target_llm: str, corpus: list[str]) -> str:
    """What a fitted converter depends on, hashed: a cached one is reused only if this matches."""
    files = [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size if Path(p).is_file() else None}
             for p in corpus]
    payload = {"settings": {k: v for k, v in asdict(settings).items() if k != "path"},
               "target_llm": str(Path(target_llm).resolve()) if target_llm else None, "corpus": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def fitted_converter(model: nn.Module, settings: WordConverterConfig, cfg: RunConfig, tokenizer: Any,
                     output_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The converter for this run: from `settings.path`, from this run folder's cache, or fitted now.

    Collective when fitting under ZeRO-3 (the target's embedding table is gathered on every rank).
    """
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoTokenizer

    if settings.path:
        weight, bias, _ = load_converter(settings.path)
        return weight, bias
    if not settings.source_llm:
        raise ConverterError("init[].word_converter.source_llm: missing; name the LLM folder the inherited "
                             "projector was trained for (recipes fill it from the inherited stage)")
    train = cfg.data.train
    corpus = list(settings.corpus) or (list(train) if isinstance(train, list) else [train] if train else [])
    key = converter_key(settings, cfg.model.llm.name_or_path or "", corpus)
    cached = output_dir / CONVERTER_FILE
    reuse = False
    if cached.is_file():
        try:
            reuse = load_converter(cached)[2].get("key") == key
        except ConverterError:
            reuse = False
    _barrier()  # every rank has decided before rank 0 may overwrite the file
    if not reuse:
        target_table = gathered_embedding_table(model.llm.model.get_input_embeddings())
        if _rank() == 0:
            source_table = read_embedding_table(settings.source_llm)
            source_tokenizer = AutoTokenizer.from_pretrained(settings.source_tokenizer or settings.source_llm)
            pairs = pair_tokens(corpus_texts(corpus), source_tokenizer, tokenizer)
            converter, report = fit_word_converter(source_table, target_table, pairs, settings, log=log.info)
            record = {"key": key, "source_llm": settings.source_llm, "target_llm": cfg.model.llm.name_or_path,
                      "corpus": corpus, **asdict(report)}
            save_converter(converter, cached, record)
            atomic_write_json(output_dir / REPORT_FILE, record)
            log.info("word converter: held-out cosine %.4f (%.4f before fitting) over %d token pairs; %d steps "
                     "in %.1f s", report.heldout_cosine, report.heldout_cosine_initial, report.pairs_heldout,
                     report.steps, report.fit_seconds)
        del target_table
        _barrier()
    else:
        log.info("word converter: reusing %s", cached)
    weight, bias, _ = load_converter(cached)
    return weight, bias


def load_converted_init(model: nn.Module, source: InitSource, cfg: RunConfig, tokenizer: Any,
                        output_dir: Path) -> list[str]:
    """Load `source` into `model`, its projector mapped through the word converter. Returns names written."""
    path = trainable_weights_file(Path(source.path))
    if not path.is_file():
        raise WeightsFileMissingError(f"init: no weights file at {path}")
    if source.modules and not any(_is_projector(m) for m in source.modules):
        raise ConverterError(f"init ({source.path}): word_converter maps the projector, but init.modules "
                             f"({', '.join(source.modules)}) does not select it; add `projector`")
    names = _file_names(path, source.rename)
    missing = [k for k in PROJECTOR_KEYS if k not in names]
    if missing:
        raise ConverterError(f"init: {path} has no {', '.join(missing)}; the word converter composes with a "
                             "linear projector trained in that checkpoint")
    projector = model.projector
    if not isinstance(projector, nn.Linear):
        raise ConverterError("init.word_converter needs model.projector.kind: linear (it composes two linear maps)")

    loaded: list[str] = []
    others = [m for m in source.modules if not _is_projector(m)] if source.modules else sorted(
        {n.split(".")[0] for n in names if not n.startswith("projector.")})
    if others:
        loaded += load_init_weights(model, replace(source, modules=others, word_converter=None))

    with safe_open(str(path), framework="pt") as handle:
        source_weight = handle.get_tensor(names["projector.weight"])
        source_bias = handle.get_tensor(names["projector.bias"])
    converter_weight, converter_bias = fitted_converter(model, source.word_converter, cfg, tokenizer, output_dir)
    weight, bias = merge_projector(source_weight, source_bias, converter_weight, converter_bias)
    expected = tuple(getattr(projector.weight, "ds_shape", projector.weight.shape))
    if tuple(weight.shape) != expected:
        raise IncompatibleCheckpointError(
            f"init: the merged projector is {tuple(weight.shape)} but this model's is {expected}: the converter's "
            "target width must be this run's LLM width and its source width the checkpoint projector's output")
    params = [projector.weight, projector.bias]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        # heavy; imported where used, once the accelerator is chosen
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gather, torch.no_grad():
        projector.weight.copy_(weight.to(projector.weight.dtype))
        projector.bias.copy_(bias.to(projector.bias.dtype))
    return loaded + list(PROJECTOR_KEYS)
